"""Builds the OpenVINO extension library (``csrc/openvino/``: the ``DinoMSDeformAttn`` op on the project's CPU kernels)
on first use, against the headers and libraries of the installed ``openvino`` wheel, and caches it.

The library goes into ``$DINO_EXT_CACHE`` (default ``~/.cache/dino_ext``) under ``openvino-<key>``, the key hashing
the sources, the openvino version, the compiler and this CPU (``-march=native``), built under an exclusive file lock
so that concurrent processes never load a half-written library. Nothing is built where it cannot be (no C++
compiler, no openvino, or a wheel without ``include/``): :func:`load_openvino_extension` then returns None and
:func:`openvino_extension_failure` says why in one line. ``DINO_OPENVINO_EXTENSION=0`` turns the extension off.

    python -m dino.ops.openvino_build     # builds it and prints the library's path
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from dino.ops.kernel import CPU_DIR, CSRC, cpu_signature

OPENVINO_DIR = CSRC / "openvino"
LIBRARY_NAME = "libdino_openvino_ext.so"
OP_NAME = "DinoMSDeformAttn"  # the op's type in an IR (csrc/openvino/dino_msda_op.h)
CXX_FLAGS = ["-std=c++17", "-O3", "-march=native", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror"]

_state: dict[str, object] = {}  # "path": the built library or None, "failure": why not; once per process


def extension_sources() -> list[Path]:
    """The files compiled into (or included by) the library; they key the cache."""
    return [OPENVINO_DIR / "dino_msda_op.cpp", OPENVINO_DIR / "extension.cpp", OPENVINO_DIR / "dino_msda_op.h",
            CPU_DIR / "ms_deform_attn_cpu.h"]


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def openvino_root() -> Path | None:
    """The installed ``openvino`` package's folder, without importing it."""
    spec = importlib.util.find_spec("openvino")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def _openvino_libs(root: Path) -> list[Path]:
    """The versioned libraries to link by full path: the wheel ships no unversioned ``libopenvino.so``."""
    libs = []
    for stem in ("libopenvino.so.", "libopenvino_onnx_frontend.so.", "libtbb.so."):
        found = sorted((root / "libs").glob(f"{stem}*"))
        if not found:
            raise FileNotFoundError(f"no {stem}* in {root / 'libs'}")
        libs.append(found[0])
    return libs


def _missing() -> str | None:
    """Why the library cannot be built here, or None."""
    if os.environ.get("DINO_OPENVINO_EXTENSION", "") == "0":
        return "DINO_OPENVINO_EXTENSION=0"
    if _cxx() is None:
        return f"no C++ compiler found ({os.environ.get('CXX', 'c++')}; set CXX)"
    root = openvino_root()
    if root is None:
        return "openvino is not installed"
    if not (root / "include" / "openvino" / "op" / "op.hpp").is_file():
        return f"the openvino wheel at {root} has no C++ headers (include/openvino)"
    missing = [str(p) for p in extension_sources() if not p.is_file()]
    if missing:
        return f"extension sources not found: {', '.join(missing)}"
    return None


def _compiler_version(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.stdout else cxx


def library_path() -> Path:
    """Where this machine's build of the library goes (it may not exist yet)."""
    root = openvino_root()
    cxx = _cxx() or ""
    h = hashlib.sha256()
    for path in extension_sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    version = (root / "libs").glob("libopenvino.so.*") if root else []
    for part in (*sorted(p.name for p in version), str(root), cxx, _compiler_version(cxx) if cxx else "",
                 cpu_signature(), " ".join(CXX_FLAGS)):
        h.update(part.encode())
    cache = Path(os.environ.get("DINO_EXT_CACHE", Path.home() / ".cache" / "dino_ext"))
    return cache / f"openvino-{h.hexdigest()[:16]}" / LIBRARY_NAME


def build_library(out: Path) -> Path:
    """Compiles and links ``out``; RuntimeError with the compiler's output when that fails."""
    root = openvino_root()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    cmd = [_cxx(), *CXX_FLAGS, "-I", str(CPU_DIR), "-I", str(OPENVINO_DIR), "-isystem", str(root / "include"),
           str(OPENVINO_DIR / "dino_msda_op.cpp"), str(OPENVINO_DIR / "extension.cpp"), "-o", str(tmp),
           *map(str, _openvino_libs(root)), f"-Wl,-rpath,{root / 'libs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        output = proc.stdout + proc.stderr
        first_error = next((ln for ln in output.splitlines() if "error" in ln), "")
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {first_error[:300]}\n{' '.join(cmd)}\n{output}")
    os.replace(tmp, out)
    return out


def load_openvino_extension() -> Path | None:
    """The path of this machine's extension library, built on the first call of a process when it is not cached
    yet; None when it cannot be built here (:func:`openvino_extension_failure` says why)."""
    if "path" not in _state:
        _state["path"], _state["failure"] = None, _missing()
        if _state["failure"] is None:
            try:
                out = library_path()
                out.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(out.parent / "lock"):
                    _state["path"] = out if out.is_file() else build_library(out)
            except Exception as exc:  # noqa: BLE001 - any build error means: no extension here
                # The first line names the failed step and the compiler's first error.
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
                _state["failure"] = f"build failed: {first_line}"
    return _state["path"]  # type: ignore[return-value]


def openvino_extension_failure() -> str | None:
    """Why :func:`load_openvino_extension` found no library (None when it did, or before it ran)."""
    return _state.get("failure")  # type: ignore[return-value]


def main() -> int:
    path = load_openvino_extension()
    if path is None:
        print(f"python -m dino.ops.openvino_build: error: {openvino_extension_failure()}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
