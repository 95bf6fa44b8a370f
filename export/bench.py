"""``dino bench``: one detector, the same images, every available inference backend, one latency table.

Each backend is prepared once (export / compile time is reported separately), warmed up, then timed per call with
CUDA synchronisation; the table gives median and p90 latency, images per second, and the largest box and score
difference from eager float32 PyTorch. Where a backend returns its per-query outputs (eager, AOTInductor, OpenVINO)
that is every query's box and class scores with eager float32 rerun on the backend's own query selection
(:func:`dino_export.query_check.check_outputs`): a reduced precision that ranks near-tied proposals differently is
measured by its precision error, not by the reordering. Elsewhere (ONNX Runtime, torch.compile, TensorRT) it is the
detections matched by query (:func:`dino_export.query_check.compare_detections`, so rank swaps of near-tied scores do
not count either). Inputs are letterboxed batches with their padding mask (the deploy-graph contract).
Backends that cannot run here are listed with the reason.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from dino.errors import UserError
from dino_export import files
from dino_export.deploy_model import DeployModel, WithQueryOutputs
from dino_export.query_check import FP16_TOLERANCE, check_outputs, compare_detections
from dino_export.tracing import check_inputs

ALL_BACKENDS = ("eager_fp32", "eager_bf16", "eager_fp16", "compile", "aoti", "ort_cpu", "ort_cuda", "openvino_cpu",
                "openvino_cpu_bf16", "tensorrt")


@dataclasses.dataclass
class BenchRow:
    backend: str
    batch: int | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    fps: float | None = None
    max_box_diff_px: float | None = None
    max_score_diff: float | None = None
    setup_s: float | None = None
    unavailable: str | None = None


class _Unavailable(Exception):
    """A backend that cannot run here; the message is the reason shown in the table."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


class _Backends:
    """Builds a runner ``images -> (boxes, scores, labels)`` per backend, sharing exported files in one folder."""

    def __init__(self, model: DeployModel, device: torch.device, image_size: tuple[int, int], max_batch: int,
                 workdir: Path, plugin_libs: list[str]):
        self.model, self.device, self.image_size = model, device, image_size
        self.max_batch, self.workdir, self.plugin_libs = max_batch, workdir, plugin_libs
        self._onnx: dict[str, Path] = {}

    def make(self, name: str) -> Callable[[torch.Tensor], tuple]:
        return getattr(self, f"_make_{name}")()

    def _make_eager_fp32(self):
        return WithQueryOutputs(self.model)

    def _autocast(self, dtype: torch.dtype):
        if self.device.type != "cuda":
            raise _Unavailable("reduced-precision eager is benchmarked on CUDA only")
        run = WithQueryOutputs(self.model)

        def run_autocast(images, mask):
            with torch.autocast("cuda", dtype=dtype):
                return run(images, mask)

        return run_autocast

    def _make_eager_bf16(self):
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise _Unavailable("this GPU has no bfloat16")
        return self._autocast(torch.bfloat16)

    def _make_eager_fp16(self):
        return self._autocast(torch.float16)

    def _make_compile(self):
        if self.device.type == "cpu" and importlib.util.find_spec("torch._inductor") is None:
            raise _Unavailable("torch.compile (Inductor) is not available")
        compiled = torch.compile(self.model, dynamic=False)
        return compiled

    def _make_aoti(self):
        from dino_export.aoti import export_aoti, load_aoti

        path, _ = export_aoti(self.model, self.workdir / "model.pt2", self.image_size, device=self.device,
                              dynamic_batch=self.max_batch > 1, max_batch=max(self.max_batch, 2))
        return load_aoti(path)

    def _onnx_file(self, deform_op: str = "standard") -> Path:
        """The ONNX graph (exported once per kind; its check is the bench's own difference column)."""
        if deform_op not in self._onnx:
            from dino_export.onnx_export import export_onnx

            cpu_model = self.model.to("cpu")
            try:
                self._onnx[deform_op] = export_onnx(
                    cpu_model, self.workdir / f"model_{deform_op}.onnx", self.image_size, deform_op,
                    dynamic_batch=True, max_batch=max(self.max_batch, 2), verify=False).path
            finally:
                self.model.to(self.device)
        return self._onnx[deform_op]

    def _ort(self, provider: str):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise _Unavailable("onnxruntime is not installed") from err
        if provider not in ort.get_available_providers():
            raise _Unavailable(f"this onnxruntime build has no {provider}")
        if provider == "CUDAExecutionProvider" and not torch.cuda.is_available():
            raise _Unavailable("no CUDA GPU")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(self._onnx_file()), opts, providers=[provider])

        def run(images, mask):
            outs = session.run(["boxes", "scores", "labels"],
                               {"images": images.detach().cpu().numpy(), "mask": mask.detach().cpu().numpy()})
            return tuple(torch.from_numpy(o) for o in outs)

        return run

    def _make_ort_cpu(self):
        return self._ort("CPUExecutionProvider")

    def _make_ort_cuda(self):
        return self._ort("CUDAExecutionProvider")

    def _openvino(self, precision: str):
        """The ONNX graph in OpenVINO's CPU plugin at ``precision`` with the per-query outputs, so its row's error is
        every query's (as for AOTInductor), compiled for each batch size at its first call with that batch static, as
        `dino export openvino` writes it (batch 1 by default). Threads: torch's count, as the eager rows."""
        if importlib.util.find_spec("openvino") is None:
            raise _Unavailable("openvino is not installed")
        from dino.predict.backend import OUTPUT_NAMES
        from dino.predict.openvino_runtime import check_precision, compile_cpu, run_compiled
        from dino_export.deploy_model import QUERY_OUTPUT_NAMES
        from dino_export.openvino_export import checkable_model, convert_onnx

        try:
            check_precision(precision)
        except UserError as why:
            raise _Unavailable(str(why).split(" Use --precision")[0]) from None
        model = checkable_model(convert_onnx(self._onnx_file()))
        names = [*OUTPUT_NAMES, *QUERY_OUTPUT_NAMES]
        compiled = {}

        def run(images, mask):
            batch = images.shape[0]
            if batch not in compiled:
                static = model.clone()
                static.reshape({"images": list(images.shape), "mask": list(mask.shape)})
                compiled[batch] = compile_cpu(static, precision, torch.get_num_threads())
            return tuple(torch.from_numpy(o) for o in run_compiled(compiled[batch], images, mask, names))

        return run

    def _make_openvino_cpu(self):
        return self._openvino("f32")

    def _make_openvino_cpu_bf16(self):
        return self._openvino("bf16")

    def _make_tensorrt(self):
        if importlib.util.find_spec("tensorrt") is None:
            raise _Unavailable("the tensorrt Python package is not installed")
        if self.device.type != "cuda":
            raise _Unavailable("TensorRT needs a CUDA device")
        from dino.predict.tensorrt_runtime import TensorRTRunner
        from dino_export.trt_export import build_checked_engine, plan_from_args

        # The plugin graph (TensorRT's GridSample: NVIDIA/TensorRT#4813), checked against ONNX Runtime when built.
        plan = plan_from_args(self._onnx_file("plugin"), self.workdir / "model.engine", False, self.plugin_libs,
                              4.0, max(self.max_batch, 1), None)
        engine, _ = build_checked_engine(plan)
        return TensorRTRunner(engine, plan.plugin_libs)


def _diff(model: DeployModel, reference, inputs: tuple, got: tuple) -> tuple[float, float]:
    """Largest box (px) and score differences of a backend's outputs ``got`` on ``inputs`` from eager float32: per
    query on the backend's selection when it returns the per-query outputs, else its detections matched by query."""
    if len(got) == 6:
        check = check_outputs(model, *inputs, got, "", FP16_TOLERANCE)
        return check.query_box.value, check.query_score.value
    score, box = compare_detections(reference, *got[:3], tolerance=FP16_TOLERANCE)
    return box.value, score.value


def run_bench(
    model: DeployModel,
    image_size: tuple[int, int],
    batches: list[int],
    backends: list[str] | None = None,
    device: str | torch.device | None = None,
    warmup: int = 3,
    iters: int = 10,
    plugin_libs: list[str] | None = None,
    workdir: str | os.PathLike | None = None,
    progress: bool = True,
    on_row: Callable[[list[BenchRow]], None] | None = None,
) -> list[BenchRow]:
    """Times ``backends`` (default: all) for every batch size on random images; returns one row per (backend, batch).

    ``on_row(rows_so_far)`` is called after every row, so a caller can save partial results of a long run.
    Raises ValueError for an unknown backend name or a non-positive batch / iteration count.
    """
    from tqdm import tqdm

    backends = list(backends or ALL_BACKENDS)
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown:
        raise UserError(f"unknown backend(s) {unknown}; choose from {', '.join(ALL_BACKENDS)}")
    if not batches or min(batches) < 1:
        raise UserError(f"--batch sizes must be >= 1, got {batches}")
    if iters < 1 or warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {iters}, {warmup}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    inputs = {b: tuple(t.to(device) for t in check_inputs(b, image_size, seed=b)) for b in batches}
    rows: list[BenchRow] = []

    def add(row: BenchRow) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(list(rows))

    with tempfile.TemporaryDirectory(dir=workdir) as tmp, torch.no_grad():
        factory = _Backends(model, device, image_size, max(batches), Path(tmp), list(plugin_libs or []))
        references = {b: model.run(*x) for b, x in inputs.items()}
        bar = tqdm(total=len(backends) * len(batches), desc="dino bench", disable=not progress, unit="run")
        for name in backends:
            bar.set_postfix_str(f"{name}: preparing")
            start = time.perf_counter()
            try:
                runner = factory.make(name)
                runner(*inputs[batches[0]])  # first call: lazy compilation (torch.compile) counts as setup
                _sync(device)
            except _Unavailable as why:
                add(BenchRow(name, unavailable=str(why)))
                bar.update(len(batches))
                continue
            except Exception as err:  # noqa: BLE001 - a failing backend is reported, the others still run
                add(BenchRow(name, unavailable=f"failed to prepare: {type(err).__name__}: "
                                                      f"{str(err).splitlines()[0][:160] if str(err) else ''}"))
                bar.update(len(batches))
                continue
            setup = time.perf_counter() - start
            for batch in batches:
                bar.set_postfix_str(f"{name} batch {batch}")
                images = inputs[batch]  # (images, mask)
                try:
                    for _ in range(warmup):
                        runner(*images)
                    _sync(device)
                    times, out = [], None
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        out = runner(*images)
                        _sync(device)
                        times.append((time.perf_counter() - t0) * 1e3)
                except Exception as err:  # noqa: BLE001
                    add(BenchRow(name, batch, unavailable=f"failed to run: {type(err).__name__}: "
                                                                  f"{str(err).splitlines()[0][:160] if str(err) else ''}"))
                    bar.update(1)
                    continue
                box_diff, score_diff = _diff(model, references[batch], images, out)
                median = statistics.median(times)
                add(BenchRow(name, batch, median, _percentile(times, 0.9), batch * 1e3 / median, box_diff,
                                     score_diff, setup))
                bar.update(1)
        bar.close()
    return rows


def nothing_ran(rows: list[BenchRow]) -> str | None:
    """The one line for a bench in which no requested backend could run (each named with its reason), or None when
    at least one was timed: a table of reasons alone is a failure (exit 2), not a result."""
    if any(r.unavailable is None for r in rows):
        return None
    reasons = "; ".join(f"{r.backend}{'' if r.batch is None else f' (batch {r.batch})'}: {r.unavailable}" for r in rows)
    return f"none of the requested backends can run here: {reasons}"


def format_table(rows: list[BenchRow], header: str) -> str:
    """A plain-text table: timed rows first, then the unavailable backends with their reasons."""
    lines = [header, "",
             f"{'backend':<17} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'img/s':>8} {'max|dbox| px':>13} "
             f"{'max|dscore|':>12} {'setup s':>8}"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        if r.unavailable is None:
            lines.append(f"{r.backend:<17} {r.batch:>5} {r.median_ms:>10.1f} {r.p90_ms:>9.1f} {r.fps:>8.2f} "
                         f"{r.max_box_diff_px:>13.3g} {r.max_score_diff:>12.3g} {r.setup_s:>8.1f}")
    missing = [r for r in rows if r.unavailable is not None]
    if missing:
        lines += ["", "unavailable:"]
        lines += [f"  {r.backend}{'' if r.batch is None else f' (batch {r.batch})'}: {r.unavailable}" for r in missing]
    return "\n".join(lines)


def write_json(rows: list[BenchRow], meta: dict, path: str | os.PathLike) -> None:
    """Writes ``{"meta": ..., "rows": [...]}`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1).encode(),
                      path)
