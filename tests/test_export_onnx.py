"""ONNX export: standard and plugin graphs of a tiny DINO, checked in ONNX Runtime against PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import dino
from dino.config import BackboneConfig, DenoisingConfig, ModelConfig, TransformerConfig
from export.deploy_model import DeployModel
from export.onnx_export import compare_detections, export_onnx
from export.plugin_node import (
    PLUGIN_DOMAIN,
    PLUGIN_INPUTS,
    PLUGIN_NAME,
    attach_reference_function,
    plugin_nodes,
)

SIZE = (96, 128)


def tiny_config() -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name="resnet18", return_levels=(1, 2, 3)),
        transformer=TransformerConfig(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                                      num_feature_levels=4, num_queries=20, enc_n_points=2, dec_n_points=2),
        denoising=DenoisingConfig(enabled=False),
        num_classes=5,
        num_select=20,
    )


@pytest.fixture(scope="module")
def deploy_model() -> DeployModel:
    torch.manual_seed(0)
    return DeployModel(dino.build_model(tiny_config()), num_select=20).eval()


@pytest.fixture(scope="module")
def standard_export(deploy_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "standard.onnx"
    return export_onnx(deploy_model, path, SIZE, "standard", dynamic_batch=True, max_batch=4)


@pytest.fixture(scope="module")
def plugin_export(deploy_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "plugin.onnx"
    return export_onnx(deploy_model, path, SIZE, "plugin", dynamic_batch=True, max_batch=4)


def _run(path_or_proto, images: torch.Tensor):
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(["boxes", "scores", "labels"], {"images": images.numpy()})


def test_standard_graph_matches_pytorch_for_batch_1_and_3(standard_export, deploy_model):
    model = onnx.load(str(standard_export.path))
    onnx.checker.check_model(model)
    assert "GridSample" in {n.op_type for n in model.graph.node}
    assert not plugin_nodes(model)
    assert [c.batch for c in standard_export.checks] == [1, 3]
    for batch in (1, 3):
        images = torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(10 + batch))
        with torch.no_grad():
            ref = deploy_model(images)
        got = _run(standard_export.path, images)
        assert got[0].shape == (batch, 20, 4) and got[1].shape == (batch, 20) and got[2].shape == (batch, 20)
        assert got[2].dtype == np.int64
        box_err, score_err, labels_match = compare_detections(ref, got)
        assert box_err <= 1e-3 * max(SIZE)
        assert score_err <= 1e-4
        assert labels_match


def test_plugin_graph_has_one_node_per_attention_with_documented_interface(plugin_export):
    model = onnx.load(str(plugin_export.path))
    onnx.checker.check_model(model)
    nodes = plugin_nodes(model)
    cfg = tiny_config()
    assert len(nodes) == cfg.transformer.enc_layers + cfg.transformer.dec_layers == plugin_export.num_plugin_nodes
    assert "GridSample" not in {n.op_type for n in model.graph.node}
    assert any(o.domain == PLUGIN_DOMAIN for o in model.opset_import)
    types = {vi.name: vi.type.tensor_type for vi in list(model.graph.value_info) + list(model.graph.input)}
    inits = {i.name: i for i in model.graph.initializer}
    for node in nodes:
        assert node.op_type == PLUGIN_NAME and node.domain == PLUGIN_DOMAIN
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"plugin_version": b"1", "plugin_namespace": b""}
        assert len(node.input) == len(PLUGIN_INPUTS) and len(node.output) == 1
        # Shape inputs are int32 (what TensorRT plugins receive); levels = num_feature_levels.
        for idx, shape in ((1, [4, 2]), (2, [4])):
            name = node.input[idx]
            if name in inits:
                assert inits[name].data_type == onnx.TensorProto.INT32 and list(inits[name].dims) == shape
            else:
                assert types[name].elem_type == onnx.TensorProto.INT32
        heads, points = cfg.transformer.nheads, cfg.transformer.enc_n_points
        loc = types[node.input[3]]
        assert [d.dim_value for d in loc.shape.dim[2:]] == [heads, 4, points, 2]
        # (B, Q, M, D) output, then a Reshape to (B, Q, M*D).
        consumers = [n for n in model.graph.node if node.output[0] in n.input]
        assert [c.op_type for c in consumers] == ["Reshape"]


def test_plugin_graph_with_reference_function_matches_pytorch(plugin_export, deploy_model):
    runnable = attach_reference_function(onnx.load(str(plugin_export.path)))
    for batch in (1, 3):
        images = torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(20 + batch))
        with torch.no_grad():
            ref = deploy_model(images)
        box_err, score_err, labels_match = compare_detections(ref, _run(runnable, images))
        assert box_err <= 1e-3 * max(SIZE)
        assert score_err <= 1e-4
        assert labels_match


def test_plugin_graph_alone_cannot_run_in_onnxruntime(plugin_export):
    # The shipped plugin graph is for TensorRT only: ORT's CPU provider must refuse the unknown node.
    with pytest.raises(Exception, match="DinoMSDeformAttn|trt.plugins"):
        ort.InferenceSession(str(plugin_export.path), providers=["CPUExecutionProvider"])


def test_unknown_deform_op_is_rejected(deploy_model, tmp_path):
    with pytest.raises(ValueError, match="--deform-op"):
        export_onnx(deploy_model, tmp_path / "x.onnx", SIZE, "gridsample")


def test_compare_detections_detects_label_and_box_differences():
    boxes = torch.zeros(1, 3, 4)
    scores = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[1, 2, 3]])
    assert compare_detections((boxes, scores, labels), (boxes, scores, labels)) == (0.0, 0.0, True)
    _, _, match = compare_detections((boxes, scores, labels), (boxes, scores, torch.tensor([[2, 2, 3]])))
    assert not match
    box_err, _, _ = compare_detections((boxes, scores, labels), (boxes + 2.5, scores, labels))
    assert box_err == 2.5
    # A tied top score makes the top label order arbitrary: not counted as a mismatch.
    tied = torch.tensor([[0.9, 0.9, 0.1]])
    assert compare_detections((boxes, tied, labels), (boxes, tied, torch.tensor([[2, 1, 3]])))[2]


def test_fp16_export_is_a_half_graph_close_to_the_half_model(tmp_path):
    from tests.export_standin import StandInDetector

    torch.manual_seed(0)
    model = DeployModel(StandInDetector(), num_select=20, half=True)
    result = export_onnx(model, tmp_path / "half.onnx", (64, 96), "standard")
    graph = onnx.load(str(result.path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # images stay float32
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)  # weights are half
    assert result.checks and result.checks[0].top_label_match
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # boxes in float32
