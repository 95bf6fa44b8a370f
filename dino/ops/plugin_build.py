"""Builds the TensorRT plugin library ``libdino_trt_plugin.so`` (csrc/tensorrt + the kernels) with nvcc and g++.

Needs TensorRT's headers only: the libnvinfer symbols the plugin uses (``getPluginRegistry``) are left undefined for
the loader, which finds them in the TensorRT process that loads the plugin (or links ``-lnvinfer`` when a library
folder is given). The plugin's own files compile with ``-Wall -Wextra -Werror``; TensorRT's headers are system
headers. The CI and the tests build against the header sets in ``../shared/third_party/tensorrt-headers/<tag>``.

    python -m dino.ops.plugin_build --tensorrt-include /path/to/TensorRT/include [--out build/trt] [--arch 90]

CMake does the same for a TensorRT install: csrc/tensorrt/CMakeLists.txt.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dino.ops.kernel import CSRC, KERNEL_DIR

PLUGIN_DIR = CSRC / "tensorrt"
HEADER_TAGS = ("v10.16", "v11.1")
# Own files: warnings are errors. TensorRT's and CUDA's headers come in as -isystem.
WARNINGS = ["-Wall", "-Wextra", "-Werror"]
SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def headers_root() -> Path | None:
    """Folder holding ``<tag>/include`` header sets: ``$DINO_TRT_HEADERS``, else the shared folder beside the repo."""
    env = os.environ.get("DINO_TRT_HEADERS")
    if env:
        return Path(env)
    shared = CSRC.parents[1] / "shared" / "third_party" / "tensorrt-headers"
    return shared if shared.is_dir() else None


def find_include(tag: str) -> Path | None:
    """``<headers_root>/<tag>/include`` when it holds NvInferRuntime.h, else None."""
    root = headers_root()
    if root is None:
        return None
    include = root / tag / "include"
    return include if (include / "NvInferRuntime.h").is_file() else None


def cuda_home() -> Path:
    """The CUDA toolkit root (with include/cuda_runtime.h): $CUDA_HOME / $CUDA_PATH, nvcc's real folder, /usr/local/cuda.

    Raises FileNotFoundError when none has the runtime header.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
        # A wrapper script (as /usr/local/bin/nvcc here) names the real nvcc inside.
        text = Path(nvcc).read_bytes()[:4096]
        for word in text.decode(errors="ignore").split():
            if word.endswith("/bin/nvcc"):
                candidates.append(str(Path(word).parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    raise FileNotFoundError("CUDA toolkit not found: set CUDA_HOME to the folder with include/cuda_runtime.h")


def _cudart_dir(cuda: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (cuda / sub / "libcudart.so").exists():
            return cuda / sub
    raise FileNotFoundError(f"libcudart.so not found under {cuda}")


def _run(cmd: list[str], log: list[str]) -> None:
    log.append(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.stdout or proc.stderr:
        log.append(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"build step failed (exit code {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.read_bytes() if isinstance(p, Path) and p.is_file() else str(p).encode())
    return h.hexdigest()[:12]


def compile_kernels(out_dir: Path, arch: str = "80", log: list[str] | None = None) -> Path:
    """The kernels' object file (``-fPIC``, one real architecture ``sm_<arch>``), cached by source hash in out_dir."""
    log = [] if log is None else log
    src = KERNEL_DIR / "ms_deform_attn.cu"
    sources = [src, KERNEL_DIR / "ms_deform_attn.h", KERNEL_DIR / "ms_deform_attn_kernels.cuh"]
    obj = out_dir / f"ms_deform_attn.{_key(*sources, arch)}.o"
    if not obj.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
        _run([str(cuda_home() / "bin" / "nvcc"), "-c", str(src), "-o", str(tmp), "-std=c++17", "-O3",
              "--expt-relaxed-constexpr", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden", "--Werror", "all-warnings", "-I", str(KERNEL_DIR)], log)
        os.replace(tmp, obj)
    return obj


def compile_plugin(include: Path, out_dir: Path, extra_flags: list[str] = (), log: list[str] | None = None) -> Path:
    """The plugin's object file, compiled against the TensorRT headers in ``include`` (warnings are errors)."""
    log = [] if log is None else log
    src = PLUGIN_DIR / "dino_msda_plugin.cpp"
    key = _key(src, PLUGIN_DIR / "dino_msda_plugin.h", KERNEL_DIR / "ms_deform_attn.h", include.resolve(),
               include / "NvInferVersion.h", *extra_flags)
    obj = out_dir / f"dino_msda_plugin.{key}.o"
    if not obj.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
        _run(["g++", "-c", str(src), "-o", str(tmp), "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden",
              *WARNINGS, *extra_flags, "-I", str(KERNEL_DIR), "-isystem", str(include),
              "-isystem", str(cuda_home() / "include")], log)
        os.replace(tmp, obj)
    return obj


def build_plugin(include: Path, out: Path, arch: str = "80", lib_dir: Path | None = None,
                 extra_flags: list[str] = (), log: list[str] | None = None, obj_dir: Path | None = None) -> Path:
    """Links ``out`` (a .so path) from the plugin and the kernels; TensorRT symbols stay undefined unless ``lib_dir``
    holds libnvinfer. Object files are cached (by source hash) in ``obj_dir`` (default: out's folder), so builds for
    several header sets compile the kernels once. Returns ``out``."""
    log = [] if log is None else log
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    obj_dir = out.parent if obj_dir is None else Path(obj_dir)
    objs = [compile_plugin(include, obj_dir, list(extra_flags), log), compile_kernels(obj_dir, arch, log)]
    cuda_lib = _cudart_dir(cuda_home())
    nvinfer = ["-L", str(lib_dir), "-lnvinfer"] if lib_dir is not None else []
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    _run(["g++", "-shared", "-o", str(tmp), *map(str, objs), *list(extra_flags), "-L", str(cuda_lib),
          f"-Wl,-rpath,{cuda_lib}", "-lcudart", *nvinfer], log)
    os.replace(tmp, out)
    return out


DRIVER_DIR = PLUGIN_DIR / "driver"


def build_driver_checks(include: Path, plugin_lib: Path, out: Path, log: list[str] | None = None) -> Path:
    """The CPU driver executable (driver/plugin_checks.cpp + the fake TensorRT objects), linked to ``plugin_lib`` and
    built with AddressSanitizer; ``plugin_lib`` should be built with ``extra_flags=SANITIZE`` too."""
    log = [] if log is None else log
    _run(["g++", "-std=c++17", "-g", "-O1", *SANITIZE, *WARNINGS, "-isystem", str(include),
          "-isystem", str(cuda_home() / "include"), str(DRIVER_DIR / "plugin_checks.cpp"),
          str(DRIVER_DIR / "fake_tensorrt.cpp"), "-o", str(out), "-rdynamic", "-Wl,--no-as-needed", str(plugin_lib),
          f"-Wl,-rpath,{plugin_lib.parent}", f"-Wl,-rpath,{_cudart_dir(cuda_home())}"], log)
    return out


def build_driver_enqueue(include: Path, plugin_lib: Path, out: Path, log: list[str] | None = None) -> Path:
    """The GPU driver library (driver/plugin_enqueue.cpp, a C function for ctypes), linked to ``plugin_lib``."""
    log = [] if log is None else log
    cuda_lib = _cudart_dir(cuda_home())
    _run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", *WARNINGS, "-isystem", str(include),
          "-isystem", str(cuda_home() / "include"), str(DRIVER_DIR / "plugin_enqueue.cpp"),
          str(DRIVER_DIR / "fake_tensorrt.cpp"), "-o", str(out), "-Wl,--no-as-needed", str(plugin_lib), "-L", str(cuda_lib), "-lcudart",
          f"-Wl,-rpath,{plugin_lib.parent}", f"-Wl,-rpath,{cuda_lib}"], log)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino.ops.plugin_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensorrt-include", type=Path,
                        help="folder with NvInferRuntime.h (default: the v10.16 set of $DINO_TRT_HEADERS or "
                             "../shared/third_party/tensorrt-headers)")
    parser.add_argument("--tensorrt-lib", type=Path, help="folder with libnvinfer.so to link (default: left undefined)")
    parser.add_argument("--out", type=Path, default=Path("build/trt"), help="output folder")
    parser.add_argument("--arch", default="90", help="GPU architecture number, e.g. 80, 86, 89, 90")
    args = parser.parse_args(argv)
    include = args.tensorrt_include or find_include(HEADER_TAGS[0])
    if include is None or not (include / "NvInferRuntime.h").is_file():
        print(f"python -m dino.ops.plugin_build: error: no NvInferRuntime.h in --tensorrt-include {include}",
              file=sys.stderr)
        return 2
    log: list[str] = []
    lib = build_plugin(include, args.out / "libdino_trt_plugin.so", args.arch, args.tensorrt_lib, log=log)
    print(f"built {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
