"""Builds and loads the kernel extensions of ``csrc/`` on first use: CUDA (``load_kernel``) and CPU
(``load_cpu_kernel``), two separate builds so that a CPU-only machine compiles only the small C++ one.

The CUDA build is attempted only when CUDA is usable (``torch.cuda.is_available()`` and an ``nvcc``), the CPU build
when a C++ compiler is found (``$CXX`` or ``c++``). Each goes into a cache directory keyed by a hash of its sources,
the torch and CUDA versions and the GPU architecture, under an exclusive file lock so that concurrent processes never
load a half-built module. A failed build logs one warning and the callers fall back to the PyTorch path, unless
``DINO_REQUIRE_KERNEL=1`` makes it an error. ``DINO_DISABLE_KERNEL=1`` skips both kernels altogether (the PyTorch
path everywhere; benchmarks use it to measure the kernels' effect).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType
from typing import Callable

from filelock import FileLock  # inter-process lock; a dependency of torch
import torch

from dino.resources import resource_dir

logger = logging.getLogger("dino.ops")

CSRC = resource_dir("csrc")  # the repository's csrc/, or its copy inside an installed wheel
KERNEL_DIR = CSRC / "ms_deform_attn"
BINDING_DIR = CSRC / "torch"
EXTENSION_NAME = "dino_msda_ext"
CPU_DIR = CSRC / "cpu"
CPU_EXTENSION_NAME = "dino_msda_cpu_ext"

_UNSET = object()  # a KernelBuild's module before its first load


def kernel_sources() -> list[Path]:
    """Sources compiled into the extension (the framework-free kernels plus the PyTorch binding); benchmark-only code
    (csrc/bench/) is built separately by ``dino.ops.bench``."""
    return [KERNEL_DIR / "ms_deform_attn.cu", BINDING_DIR / "ms_deform_attn_binding.cpp"]


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.exists():
            return str(candidate)
    return shutil.which("nvcc")


def _require() -> bool:
    return os.environ.get("DINO_REQUIRE_KERNEL", "") not in ("", "0")


def _disabled() -> bool:
    return os.environ.get("DINO_DISABLE_KERNEL", "") not in ("", "0")


def cache_dir(source_dirs: tuple[Path, ...] | None = None) -> Path:
    """Per-version build directory: ``$DINO_EXT_CACHE`` or ``~/.cache/dino_ext``, then a hash of all inputs
    (the files of ``source_dirs``, default the kernels and the PyTorch binding)."""
    if source_dirs is None:
        source_dirs = (KERNEL_DIR, BINDING_DIR)
    h = hashlib.sha256()
    for path in [p for d in source_dirs for p in sorted(d.iterdir())]:
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    if CPU_DIR in source_dirs:
        h.update(cpu_signature().encode())  # the CPU build is -march=native: one build per kind of CPU
    if torch.cuda.is_available():
        h.update(str(torch.cuda.get_device_capability()).encode())
    root = Path(os.environ.get("DINO_EXT_CACHE", Path.home() / ".cache" / "dino_ext"))
    return root / h.hexdigest()[:16]


def cpu_signature() -> str:
    """This CPU's model and instruction-set flags (Linux), else the platform's processor and machine names."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next(ln for ln in lines if ln.startswith(key)) for key in ("model name", "flags"))
    except (OSError, StopIteration):
        return f"{platform.processor()} {platform.machine()}"


def build_extension(name: str, sources: list[Path], source_dirs: tuple[Path, ...],
                    cpu: bool = False) -> ModuleType:
    """JIT-builds (or loads the cached build of) a PyTorch extension from ``sources``, with headers from
    ``source_dirs``, whose files key the cache. ``cpu``: compile and link with ``-fopenmp``, without which
    ``at::parallel_for`` (inlined from the ATen headers) runs on one thread (the module then shares torch's
    already-loaded ``libgomp.so.1``), and with ``-march=native`` (AVX2/FMA rows: measured 1.6x on the forward)."""
    # Without CUDA, importing cpp_extension warns "No CUDA runtime is found" on every run: noise for a CPU build.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    if not torch.cuda.is_available():
        cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_logger.setLevel(level)

    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise FileNotFoundError(f"ms_deform_attn kernel sources not found: {', '.join(missing)}")
    build_dir = cache_dir(source_dirs)
    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(build_dir.parent / f"{build_dir.name}.lock"):
        return load(
            name=name,
            sources=[str(p) for p in sources],
            extra_include_paths=[str(d) for d in source_dirs],
            extra_cflags=["-O3"] + (["-fopenmp", "-march=native"] if cpu else []),
            extra_ldflags=["-fopenmp"] if cpu else [],
            extra_cuda_cflags=["-O3", "-std=c++17"],
            build_directory=str(build_dir),
            verbose=os.environ.get("DINO_KERNEL_VERBOSE", "") not in ("", "0"),
        )


def cpu_kernel_sources() -> list[Path]:
    """The PyTorch binding of the CPU extension; it includes the framework-free kernels (csrc/cpu/
    ms_deform_attn_cpu.h), which the OpenVINO op (:mod:`dino.ops.openvino_build`) compiles too."""
    return [BINDING_DIR / "ms_deform_attn_cpu_binding.cpp"]


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if _nvcc() is None:
        return "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _compiler_missing() -> str | None:
    return None if _cxx() is not None else f"no C++ compiler found ({os.environ.get('CXX', 'c++')}; set CXX)"


@dataclasses.dataclass
class KernelBuild:
    """One extension of ``csrc/``: what it is built from, why it cannot be built here, and (once tried) the module or
    the reason it is unavailable. Built at most once per process, on the first :meth:`load`."""

    what: str  # "CUDA" / "CPU", in messages
    name: str  # the extension's module name
    sources: Callable[[], list[Path]]
    source_dirs: tuple[Path, ...]  # include paths; their files key the cache
    cpu: bool  # build flags of the CPU extension (build_extension)
    missing: Callable[[], str | None]  # why it cannot be built here (None: it can)
    warn_when_missing: bool  # a CPU without a compiler is worth a warning; a machine without CUDA is not
    module: object = _UNSET  # ModuleType once loaded, None after a failed or impossible build
    failure: str | None = None

    def load(self) -> ModuleType | None:
        """The compiled extension (``forward``, ``backward``), or None when it cannot be built here.

        Raises:
            RuntimeError: the build failed or is impossible and ``DINO_REQUIRE_KERNEL=1`` is set.
        """
        if self.module is _UNSET:
            self.module, self.failure = None, "DINO_DISABLE_KERNEL is set" if _disabled() else self.missing()
            if self.failure is None:
                self._build()
            elif self.warn_when_missing and not _disabled():
                logger.warning("ms_deform_attn %s kernel unavailable (%s); using the PyTorch path", self.what,
                               self.failure)
        if self.module is None and _require():
            raise RuntimeError(f"DINO_REQUIRE_KERNEL is set but the ms_deform_attn {self.what} kernel is unavailable: "
                               f"{self.failure}")
        return self.module  # type: ignore[return-value]

    def _build(self) -> None:
        try:
            self.module = build_extension(self.name, self.sources(), self.source_dirs, cpu=self.cpu)
            logger.info("ms_deform_attn %s kernel loaded from %s", self.what, cache_dir(self.source_dirs))
        except Exception as exc:  # noqa: BLE001 - any build error means: fall back
            # The compiler's output is in the exception; its first line names the failed step.
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.module, self.failure = None, f"build failed: {first_line}"
            logger.warning("ms_deform_attn %s kernel unavailable (%s); using the PyTorch path", self.what,
                           self.failure)

    def state(self) -> bool | None:
        """True/False once :meth:`load` has run, None before (never triggers a build)."""
        return None if self.module is _UNSET else self.module is not None


CUDA_KERNEL = KernelBuild("CUDA", EXTENSION_NAME, kernel_sources, (KERNEL_DIR, BINDING_DIR), cpu=False,
                          missing=_cuda_missing, warn_when_missing=False)
CPU_KERNEL = KernelBuild("CPU", CPU_EXTENSION_NAME, cpu_kernel_sources, (CPU_DIR, BINDING_DIR), cpu=True,
                         missing=_compiler_missing, warn_when_missing=True)


def load_kernel() -> ModuleType | None:
    """The CUDA extension, or None when it cannot be built here (:meth:`KernelBuild.load`)."""
    return CUDA_KERNEL.load()


def kernel_available() -> bool:
    """Whether the CUDA kernel is (or can be) loaded; builds it on the first call."""
    return load_kernel() is not None


def kernel_state() -> bool | None:
    """True/False once :func:`load_kernel` has run, None before (never triggers a build)."""
    return CUDA_KERNEL.state()


def load_cpu_kernel() -> ModuleType | None:
    """The CPU extension (float32 and float64), or None when it cannot be built here (:meth:`KernelBuild.load`)."""
    return CPU_KERNEL.load()


def cpu_kernel_state() -> bool | None:
    """True/False once :func:`load_cpu_kernel` has run, None before (never triggers a build)."""
    return CPU_KERNEL.state()
