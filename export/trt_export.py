"""``dino export trt`` end to end: ONNX (plugin graph by default) -> plugin library found or built -> engine with a
timing cache -> the engine checked against ONNX Runtime on the same inputs, query by query, before it is kept.

The standard (GridSample) graph is not the default for TensorRT: TensorRT 10.14+/11.1 was reported to give silent
wrong outputs on DETR-style GridSample graphs (NVIDIA/TensorRT issue 4813), hence the plugin graph and the check.
The classes recorded in the ONNX graph are copied to the engine's sidecar ``<engine>.json``
(:mod:`dino_export.artifact_labels`), since an engine file has no room for them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import onnx
import torch

from dino.errors import UserError
from dino.predict.labels import engine_sidecar
from dino_export.artifact_labels import onnx_labels, write_engine_sidecar
from dino_export.onnx_export import ort_providers, ort_session, run_session
from dino_export.query_check import FP16_TOLERANCE, QueryCheck, Tolerance, compare_detections, reference_from_outputs
from dino_export.tracing import check_inputs
from dino_export.trt_engine import BuildPlan, build_engine, import_tensorrt, make_build_plan

PLUGIN_LIB_NAME = "libdino_trt_plugin.so"
REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = REPO_ROOT / "csrc" / "tensorrt"
DEFAULT_PLUGIN_BUILD_DIR = REPO_ROOT / "build" / "trt"
# TensorRT may run float32 layers in TF32 (its default), whose 10-bit mantissa is float16's: one tolerance for all
# engines. Not measured: no engine has been built by this project yet (docs/deployment.md).
TRT_TOLERANCE = FP16_TOLERANCE


def find_or_build_plugin_library(build_dir: str | os.PathLike | None = None,
                                 tensorrt_root: str | os.PathLike | None = None) -> Path:
    """``libdino_trt_plugin.so`` from ``build_dir`` (default ``build/trt`` of the repository), built there with
    CMake from ``csrc/tensorrt`` when missing. Raises UserError saying what is missing (sources, cmake, TensorRT)."""
    build_dir = Path(build_dir) if build_dir is not None else DEFAULT_PLUGIN_BUILD_DIR
    lib = build_dir / PLUGIN_LIB_NAME
    if lib.is_file():
        return lib
    if not (PLUGIN_SOURCE / "CMakeLists.txt").is_file():
        raise UserError(f"no {PLUGIN_LIB_NAME} in {build_dir} and no plugin sources at {PLUGIN_SOURCE} to build it: "
                        "pass --plugin-lib path/to/libdino_trt_plugin.so")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise UserError(f"no {PLUGIN_LIB_NAME} in {build_dir} and no `cmake` to build it from {PLUGIN_SOURCE}: "
                        "install cmake and the CUDA toolkit, or pass --plugin-lib")
    configure = [cmake, "-S", str(PLUGIN_SOURCE), "-B", str(build_dir)]
    if tensorrt_root is not None:
        configure.append(f"-DTensorRT_ROOT={tensorrt_root}")
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "dino_build.log"
    with open(log, "w") as fh:
        for cmd in (configure, [cmake, "--build", str(build_dir), "-j"]):
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
                raise UserError(f"building {PLUGIN_LIB_NAME} failed ({' '.join(cmd[:2])} ...; log {log}): "
                                f"{tail[0] if tail else ''} -- pass --tensorrt-root or --plugin-lib")
    if not lib.is_file():
        raise UserError(f"the CMake build in {build_dir} did not produce {PLUGIN_LIB_NAME} (log {log})")
    return lib


def check_engine(engine: Path, plan: BuildPlan, tolerance: Tolerance = TRT_TOLERANCE, seed: int = 100
                 ) -> list[QueryCheck]:
    """Runs the engine and ONNX Runtime (the same ONNX file; plugin nodes through their GridSample reference
    function) on the same letterboxed inputs and compares the engine's detections with ONNX Runtime's per-query
    outputs, matched by query. Raises ExportCheckError naming the largest difference."""
    from dino.predict.tensorrt_runtime import TensorRTRunner

    if not torch.cuda.is_available():
        raise UserError("checking a TensorRT engine needs a CUDA GPU (or pass --no-verify)")
    session = ort_session(onnx.load(str(plan.onnx_path)), ort_providers()[0])
    runner = TensorRTRunner(engine, plan.plugin_libs)
    batches = [plan.batch] if plan.batch is not None else sorted({1, min(3, plan.max_batch)})
    checks = []
    for batch in batches:
        images, mask = check_inputs(batch, plan.image_size, seed + batch)
        reference = reference_from_outputs(run_session(session, images, mask), mask)
        got = runner(images.cuda(), mask.cuda())
        check = QueryCheck("TensorRT", batch, tolerance)
        check.detection_score, check.detection_box = compare_detections(reference, *got, tolerance=tolerance)
        checks.append(check)
        check.raise_on_failure("ONNX Runtime")
    return checks


def build_checked_engine(plan: BuildPlan, verify: bool = True, verbose: bool = False) -> tuple[Path, list[str]]:
    """Builds the engine of ``plan`` and keeps it only if :func:`check_engine` passes (unless ``verify`` is False).
    Returns (engine path, notes and check lines)."""

    def check(tmp: Path) -> list[str]:
        return [c.line() for c in check_engine(tmp, plan)]

    path, notes = build_engine(plan, verbose=verbose, check=check if verify else None)
    labels = onnx_labels(onnx.load(str(plan.onnx_path), load_external_data=False))
    sidecar = write_engine_sidecar(path, labels)
    if sidecar is not None:
        notes.append(f"classes recorded in {sidecar}")
    else:  # a sidecar left by an earlier engine of that name would name this engine's labels wrongly
        engine_sidecar(path).unlink(missing_ok=True)
        notes.append(f"{plan.onnx_path} records no classes: dino predict will name labels by its --recipe")
    if not verify:
        notes.append("engine not checked against ONNX Runtime (--no-verify): written unchecked")
    return path, notes


def plan_from_args(onnx_path: Path, output, fp16: bool, plugin_libs: list[str], workspace_gb: float, max_batch: int,
                   timing_cache, tensorrt_root=None, plugin_build_dir=None) -> BuildPlan:
    """The build plan; for a plugin graph without ``--plugin-lib`` the library is found or built first."""
    from dino_export.plugin_node import plugin_nodes

    libs = list(plugin_libs)
    if not libs and Path(onnx_path).is_file() and plugin_nodes(onnx.load(str(onnx_path), load_external_data=False)):
        libs = [str(find_or_build_plugin_library(plugin_build_dir, tensorrt_root))]
    return make_build_plan(onnx_path, output, fp16, libs, workspace_gb, max_batch, timing_cache=timing_cache)


def require_tensorrt() -> str:
    """The TensorRT version, or UserError (before any long export) when ``tensorrt`` is missing."""
    return str(import_tensorrt().__version__)
