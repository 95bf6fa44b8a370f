"""TensorRT engine builder: the build plan from ONNX files (no TensorRT needed) and, where installed, real builds."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.plugin_node import PLUGIN_DOMAIN, PLUGIN_NAME
from export.trt_engine import make_build_plan


def _write(tmp_path: Path, batch, elem=TensorProto.FLOAT, plugin=False, name="m.onnx") -> Path:
    inp = helper.make_tensor_value_info("images", elem, [batch, 3, 64, 96])
    out = helper.make_tensor_value_info("boxes", elem, [batch, 3, 64, 96])
    nodes = [helper.make_node("Identity", ["images"], ["boxes"])]
    opsets = [helper.make_opsetid("", 18)]
    if plugin:
        nodes.append(helper.make_node(PLUGIN_NAME, ["images"], ["extra"], domain=PLUGIN_DOMAIN, plugin_version="1"))
        opsets.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    model = helper.make_model(helper.make_graph(nodes, "g", [inp], [out]), opset_imports=opsets)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_dynamic_batch_gets_a_profile_from_1_to_max(tmp_path):
    plan = make_build_plan(_write(tmp_path, "batch"), max_batch=6, opt_batch=2, workspace_gb=1.5)
    assert plan.profile == ((1, 3, 64, 96), (2, 3, 64, 96), (6, 3, 64, 96))
    assert plan.static_shape is None
    assert plan.workspace_bytes == int(1.5 * (1 << 30))
    assert plan.output == tmp_path / "m.engine"
    assert plan.timing_cache == tmp_path / "m.timing.cache"
    assert not plan.graph_is_fp16 and plan.num_plugin_nodes == 0


def test_static_batch_has_no_profile_and_fp16_graph_is_detected(tmp_path):
    plan = make_build_plan(_write(tmp_path, 1, TensorProto.FLOAT16), output=tmp_path / "x.engine", fp16=True)
    assert plan.profile is None and plan.static_shape == (1, 3, 64, 96)
    assert plan.graph_is_fp16 and plan.fp16_requested


def test_plugin_graph_requires_the_plugin_library(tmp_path):
    path = _write(tmp_path, "batch", plugin=True)
    with pytest.raises(ValueError, match="--plugin-lib"):
        make_build_plan(path)
    with pytest.raises(FileNotFoundError, match="libmissing.so"):
        make_build_plan(path, plugin_libs=[tmp_path / "libmissing.so"])
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"")
    assert make_build_plan(path, plugin_libs=[lib]).num_plugin_nodes == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"workspace_gb": 0}, "--workspace-gb"),
    ({"max_batch": 0}, "--max-batch"),
    ({"max_batch": 2, "opt_batch": 3}, "optimisation batch"),
])
def test_bad_arguments_name_the_option(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_build_plan(_write(tmp_path, "batch"), **kwargs)


def test_missing_onnx_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.onnx"):
        make_build_plan(tmp_path / "nothere.onnx")


def test_input_must_be_an_image_batch(tmp_path):
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, "h", 96])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["images"], ["o"])], "g", [inp],
                                                [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)]))
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match="static H and W"):
        make_build_plan(tmp_path / "bad.onnx")


@pytest.mark.tensorrt
@pytest.mark.cuda
def test_standard_graph_builds_and_matches_pytorch(tmp_path):
    import dino
    from export.deploy_model import DeployModel
    from export.onnx_export import compare_detections, export_onnx
    from export.trt_engine import build_engine
    from export.trt_runtime import TensorRTRunner
    from tests.test_export_onnx import SIZE, tiny_config

    torch.manual_seed(0)
    model = DeployModel(dino.build_model(tiny_config()), num_select=20).eval()
    exported = export_onnx(model, tmp_path / "m.onnx", SIZE, "standard", dynamic_batch=True, max_batch=4)
    engine, _ = build_engine(make_build_plan(exported.path, max_batch=4))
    runner = TensorRTRunner(engine)
    images = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        ref = model(images)
    got = runner(images.cuda())
    box_err, score_err, _ = compare_detections(ref, got)
    assert box_err <= 1e-2 * max(SIZE) and score_err <= 1e-3
