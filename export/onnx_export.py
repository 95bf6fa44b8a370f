"""ONNX export of a :class:`~export.deploy_model.DeployModel`: the standard graph and the TensorRT plugin graph.

- ``standard``: deformable attention lowered to GridSample (opset 18 >= 16), runs anywhere ONNX Runtime runs.
- ``plugin``: each deformable attention call is one ``trt.plugins::DinoMSDeformAttn`` node (see
  :mod:`export.plugin_node`), for TensorRT with ``csrc/tensorrt/``'s plugin library.

Both use the dynamo-based ``torch.onnx.export`` (the default since PyTorch 2.9); the plugin node comes from a
``custom_translation_table`` entry for the seam's custom op. Every export is checked with ``onnx.checker`` and run in
ONNX Runtime against PyTorch (the plugin graph through a GridSample reference function attached to a copy).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxscript import opset18 as op

from export.deform_route import custom_op_overloads
from export.deploy_model import DeployModel
from export.plugin_node import (
    PLUGIN_DOMAIN,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    attach_reference_function,
    plugin_nodes,
    register_onnx_schema,
)
from export.tracing import export_program

OPSET = 18
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
DEFORM_OPS = ("standard", "plugin")


def _plugin_translation(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """ONNX for one seam call: the plugin node (int32 shape inputs), then (B, Q, M, D) -> (B, Q, M*D)."""
    from onnxscript.values import Opset

    trt = Opset(PLUGIN_DOMAIN, 1)
    out = trt.DinoMSDeformAttn(
        value,
        op.Cast(spatial_shapes, to=onnx.TensorProto.INT32),
        op.Cast(level_start_index, to=onnx.TensorProto.INT32),
        sampling_locations,
        attention_weights,
        plugin_version=PLUGIN_VERSION,
        plugin_namespace=PLUGIN_NAMESPACE,
    )
    return op.Reshape(out, op.Constant(value_ints=[0, 0, -1]))


@dataclasses.dataclass
class OnnxCheck:
    """ONNX Runtime vs PyTorch on the same images."""

    provider: str
    batch: int
    max_box_error_px: float
    max_score_error: float
    top_label_match: bool

    def line(self) -> str:
        return (
            f"ONNX Runtime {self.provider} batch {self.batch}: max |boxes| error {self.max_box_error_px:.3g} px, "
            f"max |scores| error {self.max_score_error:.3g}, top labels {'match' if self.top_label_match else 'DIFFER'}"
        )


@dataclasses.dataclass
class OnnxExport:
    path: Path
    deform_op: str
    image_size: tuple[int, int]
    dynamic_batch: bool
    num_plugin_nodes: int
    checks: list[OnnxCheck]
    notes: list[str]


def ort_providers() -> list[str]:
    """ONNX Runtime providers usable here: CUDA only where a GPU is actually present."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def compare_detections(
    reference: tuple[torch.Tensor, ...], candidate: tuple[np.ndarray | torch.Tensor, ...], tie_eps: float = 1e-4
) -> tuple[float, float, bool]:
    """Max box error (px), max score error, and whether the top-1 labels agree wherever the top score is not tied.

    Both tuples are (boxes (B,K,4), scores (B,K), labels (B,K)). A top score within ``tie_eps`` of the second is a
    tie; the label order of tied scores is arbitrary, so those images are skipped for the label check.
    """
    ref_boxes, ref_scores, ref_labels = (torch.as_tensor(np.asarray(t.detach().cpu() if torch.is_tensor(t) else t))
                                         for t in reference)
    boxes, scores, labels = (torch.as_tensor(np.asarray(t.detach().cpu() if torch.is_tensor(t) else t))
                             for t in candidate)
    box_err = (boxes.float() - ref_boxes.float()).abs().max().item()
    score_err = (scores.float() - ref_scores.float()).abs().max().item()
    match = True
    for b in range(ref_scores.shape[0]):
        if ref_scores.shape[1] > 1 and (ref_scores[b, 0] - ref_scores[b, 1]).abs() < tie_eps:
            continue
        match &= bool(ref_labels[b, 0] == labels[b, 0])
    return box_err, score_err, match


def _write_atomically(model: onnx.ModelProto, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _trace_to_onnx(model: DeployModel, example: torch.Tensor, deform_op: str, dynamic_batch: bool,
                   max_batch: int) -> onnx.ModelProto:
    table = None
    if deform_op == "plugin":
        register_onnx_schema()
        table = {overload: _plugin_translation for overload in custom_op_overloads()}
    program = export_program(model, example, dynamic_batch, max_batch, use_custom_op=deform_op == "plugin")
    onnx_program = torch.onnx.export(
        program,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        custom_translation_table=table,
        optimize=True,
        verbose=False,
    )
    return onnx_program.model_proto


def export_onnx(
    model: DeployModel,
    output: str | os.PathLike,
    image_size: tuple[int, int],
    deform_op: str = "standard",
    dynamic_batch: bool = False,
    max_batch: int = 32,
    verify: bool = True,
    seed: int = 0,
) -> OnnxExport:
    """Exports ``model`` for ``(H, W)`` images to ``output`` (written atomically), checks it, and verifies it.

    With ``dynamic_batch`` the batch axis is symbolic (1..``max_batch``) and verification runs batches 1 and 3;
    otherwise the graph is fixed at batch 1. Raises ValueError for an unknown ``deform_op`` and RuntimeError when
    ONNX Runtime disagrees with PyTorch beyond tolerance (boxes 1e-3 of the image size, 1e-3 scores; 5e-2 and 2e-2
    for a float16 model) or the plugin graph does not hold one plugin node per attention call.
    """
    if deform_op not in DEFORM_OPS:
        raise ValueError(f"--deform-op must be one of {DEFORM_OPS}, got {deform_op!r}")
    height, width = image_size
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced at batch 2.
    example = torch.randn(2 if dynamic_batch else 1, 3, height, width, generator=gen)
    proto = _trace_to_onnx(model, example, deform_op, dynamic_batch, max_batch)
    notes: list[str] = []
    n_plugin = len(plugin_nodes(proto))
    if deform_op == "plugin" and n_plugin == 0:
        raise RuntimeError("plugin export produced no DinoMSDeformAttn node: the seam did not reach the custom op")
    if deform_op == "standard" and n_plugin:
        raise RuntimeError(f"standard export unexpectedly contains {n_plugin} plugin nodes")
    onnx.checker.check_model(proto, full_check=False)
    _write_atomically(proto, path)

    checks: list[OnnxCheck] = []
    if verify:
        runnable = attach_reference_function(proto) if deform_op == "plugin" else proto
        if deform_op == "plugin":
            notes.append("plugin nodes verified through a GridSample reference function (not the TensorRT plugin)")
        checks, more = verify_onnx(model, runnable, (height, width), [1, 3] if dynamic_batch else [1], seed=seed)
        notes += more
    return OnnxExport(path, deform_op, (height, width), dynamic_batch, n_plugin, checks, notes)


def verify_onnx(model: DeployModel, proto: onnx.ModelProto, image_size: tuple[int, int], batches: list[int],
                seed: int = 0) -> tuple[list[OnnxCheck], list[str]]:
    """Runs ``proto`` in ONNX Runtime on random images and compares with ``model``; raises RuntimeError on mismatch."""
    import onnxruntime as ort

    height, width = image_size
    box_tol = 1e-3 * max(height, width)
    score_tol = 1e-3
    if model.half:
        box_tol, score_tol = 5e-2 * max(height, width), 2e-2
    checks: list[OnnxCheck] = []
    notes: list[str] = []
    data = proto.SerializeToString()
    for provider in ort_providers():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(data, opts, providers=[provider])
        except Exception as err:  # noqa: BLE001 - an ORT build without a kernel is a note, not a failure
            notes.append(f"ONNX Runtime {provider} could not load the graph: {str(err).splitlines()[0][:200]}")
            continue
        for batch in batches:
            gen = torch.Generator().manual_seed(seed + batch)
            images = torch.randn(batch, 3, height, width, generator=gen)
            with torch.no_grad():
                reference = model(images)
            try:
                got = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: images.numpy()})
            except Exception as err:  # noqa: BLE001
                notes.append(f"ONNX Runtime {provider} could not run the graph: {str(err).splitlines()[0][:200]}")
                break
            box_err, score_err, match = compare_detections(reference, got)
            check = OnnxCheck(provider.replace("ExecutionProvider", ""), batch, box_err, score_err, match)
            checks.append(check)
            if box_err > box_tol or score_err > score_tol or not match:
                raise RuntimeError(f"ONNX Runtime disagrees with PyTorch: {check.line()} "
                                   f"(tolerance {box_tol:.3g} px, {score_tol:.3g})")
    return checks, notes
