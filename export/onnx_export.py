"""ONNX export of a :class:`~dino_export.deploy_model.DeployModel`: the standard graph and the TensorRT plugin graph.

- ``standard``: deformable attention lowered to GridSample (opset 18 >= 16), runs anywhere ONNX Runtime runs.
- ``plugin``: each deformable attention call is one ``trt.plugins::DinoMSDeformAttn`` node (see
  :mod:`dino_export.plugin_node`), for TensorRT with ``csrc/tensorrt/``'s plugin library.

Both use the dynamo-based ``torch.onnx.export`` (the default since PyTorch 2.9); the plugin node comes from a
``custom_translation_table`` entry for the ``dino::ms_deform_attn`` custom op. The graph is traced with three extra
outputs, the detector's raw ``pred_logits``/``pred_boxes`` and its ``query_indices``; the shipped file drops them
from its outputs but keeps the named values inside, so :func:`check_onnx` can read them back from any exported file
and compare every query with PyTorch run on the same query selection (:mod:`dino_export.query_check`).
The file is written to a temporary name, checked, and only then moved into place. The model's class count and
category names go in the graph's ``metadata_props`` (:mod:`dino_export.artifact_labels`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnxscript import opset18 as op

from dino.errors import UserError
from dino.predict.backend import INPUT_NAMES, OUTPUT_NAMES
from dino_export import files
from dino_export.artifact_labels import set_onnx_labels
from dino_export.check_reference import Referee
from dino_export.deploy_model import QUERY_OUTPUT_NAMES, DeployModel, WithQueryOutputs
from dino_export.group_norm import staged_group_norms
from dino_export.plugin_node import (
    PLUGIN_DOMAIN,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    attach_reference_function,
    plugin_nodes,
    register_onnx_schema,
)
from dino_export.query_check import ExportCheckError, QueryCheck, Tolerance
from dino_export.tracing import check_inputs, example_inputs, export_program

OPSET = 18
DEFORM_OPS = ("standard", "plugin")

def _plugin_translation(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """ONNX for one custom-op call: the plugin node (int32 shape inputs), then (B, Q, M, D) -> (B, Q, M*D)."""
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
class OnnxExport:
    path: Path
    deform_op: str
    image_size: tuple[int, int]
    dynamic_batch: bool
    num_plugin_nodes: int
    checks: list[QueryCheck]
    notes: list[str]


def ort_providers() -> list[str]:
    """ONNX Runtime providers usable here: CUDA only where a GPU is actually present."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def _trace_to_onnx(model: DeployModel, example: tuple[torch.Tensor, torch.Tensor], deform_op: str,
                   dynamic_batch: bool, max_batch: int) -> onnx.ModelProto:
    """The graph with all six outputs (detections + per-query outputs)."""
    table = None
    if deform_op == "plugin":
        register_onnx_schema()
        table = {torch.ops.dino.ms_deform_attn.default: _plugin_translation}
    # GroupNorm traced with staged reductions: ONNX Runtime's InstanceNormalization loses float32 precision on the
    # input projections of trained weights at large canvases (dino_export.group_norm).
    with staged_group_norms(model):
        program = export_program(WithQueryOutputs(model), example, dynamic_batch, max_batch,
                                 custom_op=deform_op == "plugin")
    with _quiet_constant_folding():
        onnx_program = torch.onnx.export(
            program,
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=[*OUTPUT_NAMES, *QUERY_OUTPUT_NAMES],
            custom_translation_table=table,
            optimize=True,
            verbose=False,
        )
    return onnx_program.model_proto


@contextlib.contextmanager
def _quiet_constant_folding() -> Iterator[None]:
    """onnxscript's optimizer warns once per multi-output node it leaves unfolded ("Skipping constant folding for
    op Split with multiple outputs", dozens of lines for DINO); nothing is wrong with those nodes."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        yield
    finally:
        folding.setLevel(level)


def shipped_graph(traced: onnx.ModelProto) -> onnx.ModelProto:
    """The traced graph with only the contract's outputs; the per-query values stay inside under their names."""
    produced = {o for n in traced.graph.node for o in n.output}
    missing = [name for name in QUERY_OUTPUT_NAMES if name not in produced]
    if missing:
        raise RuntimeError(f"the traced graph has no value named {missing}: the per-query check could not read it")
    keep = [o for o in traced.graph.output if o.name not in QUERY_OUTPUT_NAMES]
    del traced.graph.output[:]
    traced.graph.output.extend(keep)
    return traced


def checkable_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a shipped graph that ONNX Runtime can run with the per-query values as extra outputs (and the plugin
    nodes computed by the GridSample reference function). For checking only: never ship it."""
    out = attach_reference_function(model) if plugin_nodes(model) else onnx.ModelProto.FromString(
        model.SerializeToString())
    have = {o.name for o in out.graph.output}
    produced = {o for n in out.graph.node for o in n.output}
    types = {"query_indices": onnx.TensorProto.INT64}
    for name in QUERY_OUTPUT_NAMES:
        if name not in produced:
            raise ExportCheckError(f"the graph has no value named {name!r}: not a graph exported by this version")
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT),
                                                                       None))
    return out


def ort_session(model: onnx.ModelProto, provider: str):
    """An ONNX Runtime session of :func:`checkable_graph` of ``model``; ExportCheckError if it cannot load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(checkable_graph(model).SerializeToString(), opts, providers=[provider])
    except ExportCheckError:
        raise
    except Exception as err:  # noqa: BLE001 - a graph ONNX Runtime cannot load is a failed check
        raise ExportCheckError(f"ONNX Runtime {provider} could not load the graph, so it could not be checked: "
                               f"{str(err).splitlines()[0][:300]}") from err


def run_session(session, images: torch.Tensor, mask: torch.Tensor) -> list:
    """The six outputs ``(boxes, scores, labels, pred_logits, pred_boxes, query_indices)`` as numpy arrays."""
    feeds = {"images": images.detach().cpu().float().numpy(), "mask": mask.detach().cpu().numpy()}
    try:
        return session.run([*OUTPUT_NAMES, *QUERY_OUTPUT_NAMES], feeds)
    except Exception as err:  # noqa: BLE001 - a graph that cannot run is a failed check
        raise ExportCheckError(f"ONNX Runtime could not run the graph: {str(err).splitlines()[0][:300]}") from err


def check_batches(dynamic_batch: bool) -> list[int]:
    return [1, 3] if dynamic_batch else [1]


def check_onnx(model: DeployModel, graph: onnx.ModelProto | str | os.PathLike, image_size: tuple[int, int],
               batches: list[int], tolerance: Tolerance | None = None, seed: int = 100,
               reference: str = "auto") -> list[QueryCheck]:
    """Runs ``graph`` (a shipped file or proto) in ONNX Runtime and compares it with ``model`` query by query,
    judged as :class:`~dino_export.check_reference.Referee` says (``reference``: auto, float64 or float32;
    ``tolerance`` fixes the tolerance of a float32 or float16 check).

    Raises ExportCheckError naming the largest difference when any comparison is beyond tolerance, or when ONNX
    Runtime cannot load or run the graph.
    """
    proto = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph))
    referee = Referee(model, image_size, reference, tolerance)
    checks = []
    for provider in ort_providers():
        session = ort_session(proto, provider)
        for batch in batches:
            images, mask = check_inputs(batch, image_size, seed + batch)
            got = run_session(session, images, mask)
            backend = f"ONNX Runtime {provider.replace('ExecutionProvider', '')}"
            checks.append(referee.check(images, mask, got, backend))
            checks[-1].raise_on_failure(referee.reference_name)
    return checks


def export_onnx(
    model: DeployModel,
    output: str | os.PathLike,
    image_size: tuple[int, int],
    deform_op: str = "standard",
    dynamic_batch: bool = False,
    max_batch: int = 32,
    verify: bool = True,
    seed: int = 0,
    labels: dict[str, str] | None = None,
    reference: str = "auto",
) -> OnnxExport:
    """Exports ``model`` for ``(H, W)`` canvases to ``output``; checks it before it is moved into place.

    With ``dynamic_batch`` the batch axis is symbolic (1..``max_batch``) and the check runs batches 1 and 3;
    otherwise the graph is fixed at batch 1. Without ``verify`` the file is written unchecked (said in the notes).
    ``labels`` (:func:`dino_export.artifact_labels.model_labels`) are stored in the graph's ``metadata_props``.
    ``reference`` picks what the check judges the graph against (:class:`~dino_export.check_reference.Referee`).
    Raises UserError for an unknown ``deform_op`` and ExportCheckError (nothing written) when the check fails.
    """
    if deform_op not in DEFORM_OPS:
        raise UserError(f"--deform-op must be one of {DEFORM_OPS}, got {deform_op!r}")
    height, width = image_size
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced at batch 2.
    example = example_inputs(2 if dynamic_batch else 1, (height, width), seed=seed)
    proto = shipped_graph(_trace_to_onnx(model, example, deform_op, dynamic_batch, max_batch))
    n_plugin = len(plugin_nodes(proto))
    if deform_op == "plugin" and n_plugin == 0:
        raise RuntimeError("plugin export produced no DinoMSDeformAttn node: the seam did not reach the custom op")
    if deform_op == "standard" and n_plugin:
        raise RuntimeError(f"standard export unexpectedly contains {n_plugin} plugin nodes")
    set_onnx_labels(proto, labels or {})
    onnx.checker.check_model(proto, full_check=False)
    notes: list[str] = []
    checks: list[QueryCheck] = []
    with files.staged(output) as tmp:
        onnx.save(proto, str(tmp))
        if verify:
            if deform_op == "plugin":
                notes.append("plugin nodes checked through a GridSample reference function (not the TensorRT plugin)")
            checks = check_onnx(model, tmp, (height, width), check_batches(dynamic_batch), reference=reference)
        else:
            notes.append("not checked against PyTorch (--no-verify): written unchecked")
        path = files.commit(tmp, output)
    return OnnxExport(path, deform_op, (height, width), dynamic_batch, n_plugin, checks, notes)
