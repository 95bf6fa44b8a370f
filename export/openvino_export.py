"""OpenVINO IR export of a :class:`~dino_export.deploy_model.DeployModel`, checked query by query like the ONNX export.

The IR is converted from an ONNX graph (:func:`dino_export.onnx_export.export_onnx`, itself checked in ONNX Runtime
first): the plugin graph, whose deformable attention nodes become dino's OpenVINO op (``csrc/openvino/``, the project's
CPU kernel; rt_info ``dino.extension``), where that extension builds (:mod:`dino.ops.openvino_build`), else the
standard graph (GridSample), said in one note.
Either way it is the same deploy model: ``images (B, 3, H, W)``, ``mask (B, H, W)`` in, ``boxes``,
``scores``, ``labels`` out, batch 1 or (``dynamic_batch``) symbolic. The detector's per-query values
(``pred_logits``, ``pred_boxes``, ``query_indices``) keep their names inside the IR, so :func:`check_openvino` adds
them as outputs of a copy and compares every query with PyTorch on the same selection
(:func:`dino_export.query_check.check_outputs`). Weights are saved in float32 (``compress_to_fp16=False``); the
arithmetic precision (f32 or bf16, :mod:`dino.predict.openvino_runtime`) and the class metadata are recorded in the
IR's ``rt_info``. Both files are written in a temporary folder next to the target, checked, and only then moved into
place (``model.bin`` first, then ``model.xml``).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from dino.errors import UserError
from dino.ops.openvino_build import OP_NAME, load_openvino_extension, openvino_extension_failure
from dino.predict.backend import OUTPUT_NAMES
from dino.predict.openvino_runtime import (
    PRECISIONS,
    check_precision,
    compile_cpu,
    extension_library,
    openvino,
    read_ir,
    run_compiled,
    set_extension,
    set_metadata,
    set_precision,
)
from dino_export import files
from dino_export.check_reference import Referee
from dino_export.deploy_model import QUERY_OUTPUT_NAMES, DeployModel
from dino_export.onnx_export import check_batches, export_onnx
from dino_export.openvino_int8 import Int8Plan, write_int8
from dino_export.query_check import ExportCheckError, QueryCheck, Tolerance
from dino_export.tracing import check_inputs

# Not measured on a bf16 CPU (none was available: this project's CPU machines list FP32, INT8 only). What rests
# under it: OpenVINO bf16 on the trained quickstart model at 64x64, top-10 detections against ONNX Runtime fp32,
# measured on an avx512_bf16 CPU (issue 25): 9.7e-3 in score, 0.19 px; PyTorch CPU autocast bfloat16 of a quickstart
# model trained 3 epochs, every query of the 64 validation images against float32: 8.1e-3 and 0.42 px
# (docs/deployment.md "OpenVINO"). bf16 keeps 8 significant bits, so a box error grows with the coordinates: the box
# tolerance is 2% of the canvas's longer side, at least 2 px (:func:`bf16_tolerance`). To be re-measured where bf16
# runs.
BF16_TOLERANCE = Tolerance(score=0.05, box_px=2.0)
BF16_BOX_FRACTION = 0.02


def bf16_tolerance(image_size: tuple[int, int]) -> Tolerance:
    """The bf16 check's tolerance on an ``(H, W)`` canvas: :data:`BF16_TOLERANCE`, its box part at least
    :data:`BF16_BOX_FRACTION` of the longer side."""
    return Tolerance(score=BF16_TOLERANCE.score,
                     box_px=max(BF16_TOLERANCE.box_px, BF16_BOX_FRACTION * max(image_size)))


@dataclasses.dataclass
class OpenVinoExport:
    path: Path  # model.xml; the weights are path.with_suffix(".bin")
    precision: str
    image_size: tuple[int, int]
    dynamic_batch: bool
    checks: list[QueryCheck]  # ONNX Runtime's of the intermediate ONNX graph, then OpenVINO's
    notes: list[str]


def weights_path(xml: str | os.PathLike) -> Path:
    """``model.xml`` -> ``model.bin``, where OpenVINO looks for an IR's weights."""
    return Path(xml).with_suffix(".bin")


def checkable_model(ir):
    """A copy of the IR ``ir`` (path or ``openvino.Model``) with the per-query values as extra outputs, for checks and
    the benchmark's error column; never shipped. ExportCheckError when a value is missing."""
    model = read_ir(ir) if isinstance(ir, (str, os.PathLike)) else ir.clone()
    try:
        model.add_outputs(list(QUERY_OUTPUT_NAMES))
    except RuntimeError as err:
        raise ExportCheckError(f"the IR has no values named {list(QUERY_OUTPUT_NAMES)}, so it could not be checked "
                               f"query by query: {str(err).splitlines()[0][:200]}") from err
    return model


def _referee(model: DeployModel, image_size: tuple[int, int], precision: str, tolerance: Tolerance | None,
             reference: str) -> Referee:
    """f32: judged as the ONNX export is (:class:`~dino_export.check_reference.Referee`, ``reference`` auto, float64
    or float32); bf16: against PyTorch float32 at :func:`bf16_tolerance` (bf16 rounding is far beyond any multiple of
    float32's distance from float64)."""
    if precision == "bf16":
        return Referee(model, image_size, "float32", tolerance or bf16_tolerance(image_size))
    return Referee(model, image_size, reference, tolerance)


def check_openvino(model: DeployModel, ir, image_size: tuple[int, int], batches: list[int], precision: str = "f32",
                   tolerance: Tolerance | None = None, seed: int = 100, threads: int | None = None,
                   reference: str = "auto") -> list[QueryCheck]:
    """Runs the IR ``ir`` (``model.xml`` path or ``openvino.Model``) on OpenVINO's CPU at ``precision`` and compares
    it with ``model`` query by query, on the inputs :func:`dino_export.onnx_export.check_onnx` uses and judged as it
    judges (``reference``, ``tolerance``: see :func:`_referee`).

    Raises ExportCheckError (GraphDisagrees) naming the largest difference beyond tolerance, or when OpenVINO cannot
    compile or run the IR; UserError when this CPU lacks ``precision``.
    """
    checkable = checkable_model(ir)
    check_precision(precision)
    try:
        compiled = compile_cpu(checkable, precision, threads)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - an IR OpenVINO cannot compile is a failed check
        raise ExportCheckError(f"OpenVINO could not compile the IR, so it could not be checked: "
                               f"{str(err).splitlines()[0][:300]}") from err
    referee = _referee(model, image_size, precision, tolerance, reference)
    checks = []
    for batch in batches:
        images, mask = check_inputs(batch, image_size, seed + batch)
        try:
            got = run_compiled(compiled, images, mask, [*OUTPUT_NAMES, *QUERY_OUTPUT_NAMES])
        except Exception as err:  # noqa: BLE001 - an IR that cannot run is a failed check
            raise ExportCheckError(f"OpenVINO could not run the IR: {str(err).splitlines()[0][:300]}") from err
        checks.append(referee.check(images, mask, got, f"OpenVINO CPU {precision}"))
        if precision == "bf16":
            checks[-1].basis = "judged against PyTorch float32 at the bf16 tolerance"
        checks[-1].raise_on_failure(referee.reference_name)
    return checks


def convert_onnx(onnx_path: str | os.PathLike):
    """The ``openvino.Model`` of an exported ONNX graph (tensor names kept, so the per-query values stay findable).
    Where dino's OpenVINO extension builds, a plugin graph's ``trt.plugins::DinoMSDeformAttn`` nodes become its op,
    and the model records that it needs it (:func:`~dino.predict.openvino_runtime.set_extension`)."""
    if load_openvino_extension() is None:
        return openvino().convert_model(str(onnx_path))
    ir = openvino().convert_model(str(onnx_path), extension=[extension_library(onnx_path)])
    if any(op.get_type_name() == OP_NAME for op in ir.get_ops()):
        set_extension(ir)
    return ir


def deform_graph(notes: list[str]) -> str:
    """The ONNX graph kind an IR is converted from: ``plugin`` (deformable attention as dino's OpenVINO op, the
    project's CPU kernel) where the extension builds, else ``standard`` (GridSample), saying why in ``notes``."""
    if load_openvino_extension() is not None:
        return "plugin"
    notes.append(f"dino's OpenVINO extension is unavailable ({openvino_extension_failure()}): wrote the GridSample "
                 "IR")
    return "standard"


def export_openvino(
    model: DeployModel,
    output: str | os.PathLike,
    image_size: tuple[int, int],
    dynamic_batch: bool = False,
    max_batch: int = 32,
    precision: str = "f32",
    verify: bool = True,
    labels: dict[str, str] | None = None,
    reference: str = "auto",
    int8: Int8Plan | None = None,
) -> OpenVinoExport:
    """Exports ``model`` for ``(H, W)`` canvases to ``output`` (``.xml``, weights beside it in ``.bin``).

    The ONNX graph is exported and checked first, converted, saved, and the IR checked at ``precision`` before both
    files are moved into place. Without ``verify`` nothing is checked (said in the notes) and a ``precision`` this
    CPU lacks may be recorded for another machine. ``reference``: what both checks judge against
    (:class:`~dino_export.check_reference.Referee`; a bf16 IR is judged against float32). Raises UserError for a bad ``output`` or ``precision`` (before
    exporting anything) and ExportCheckError (nothing written) when a check fails. ``precision="int8"`` needs
    ``int8`` (:class:`~dino_export.openvino_int8.Int8Plan`): the f32 IR is checked, then quantised and judged by
    AP (:func:`~dino_export.openvino_int8.write_int8`; ApDropTooLarge, nothing written, past its bound).
    """
    output = Path(output)
    if output.suffix != ".xml":
        raise UserError(f"--output {output}: an OpenVINO IR is a .xml file (its weights go beside it in .bin)")
    if model.half:
        raise UserError("an OpenVINO IR is exported from the float32 model; choose its arithmetic with --precision")
    if verify:
        check_precision(precision)
    elif precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8":
        if int8 is None:
            raise ValueError("precision='int8' needs an Int8Plan (int8=...)")
        int8.check()  # a bad --calibration-images before the f32 export's minutes
    output.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    checks: list[QueryCheck] = []
    with tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent) as tmp:
        graph = deform_graph(notes)
        onnx_export = export_onnx(model, Path(tmp) / "model.onnx", image_size, graph, dynamic_batch, max_batch,
                                  verify=verify, labels=labels, reference=reference)
        checks += onnx_export.checks
        ir = convert_onnx(onnx_export.path)
        float_precision = "f32" if precision == "int8" else precision  # int8 quantises the checked f32 IR
        set_precision(ir, float_precision)
        set_metadata(ir, labels or {})
        xml = Path(tmp) / "model.xml"
        openvino().save_model(ir, str(xml), compress_to_fp16=False)
        if verify:
            with torch.no_grad():
                checks += check_openvino(model, xml, image_size, check_batches(dynamic_batch), float_precision,
                                         reference=reference)
        else:
            notes.append("not checked against PyTorch (--no-verify): written unchecked")
        if precision == "int8":
            xml = write_int8(ir, xml, onnx_export.path, image_size, int8, verify, notes)
        files.commit(weights_path(xml), weights_path(output))
        path = files.commit(xml, output)
    return OpenVinoExport(path, precision, tuple(image_size), dynamic_batch, checks, notes)
