"""dino's OpenVINO extension (csrc/openvino/, built by dino.ops.openvino_build): the DinoMSDeformAttn op, reached from
an ONNX trt.plugins::DinoMSDeformAttn node as the export reaches it, against the PyTorch path (odd shapes, points
outside the map, L = 1..5; f32 inside a bf16 graph); `dino export openvino` with it writes an IR that passes its
checks at f32 and bf16, records the extension and predicts as eager; an IR loaded where the extension cannot be built
is one line; where it cannot be built the export writes the GridSample IR with one line."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import openvino as ov
import PIL.Image
import pytest
import torch
from onnx import TensorProto, helper

from dino.ops import ms_deform_attn_pytorch, openvino_build
from dino.predict import openvino_runtime
from dino_cli import main
from dino_export.deploy_model import build_deploy_model
from dino_export.openvino_export import BF16_TOLERANCE, check_openvino
from dino_export.query_check import FP32_TOLERANCE

from tests.conftest import TINY_RECIPE

SIZE = (64, 64)
# (B, level shapes, M, D, Q, P): odd H/W, D = 32 (the compiled-in channel count) and others, L = 1..5.
CASES = [
    (1, [(7, 9)], 2, 8, 13, 3),
    (2, [(10, 13), (5, 7)], 3, 5, 17, 2),
    (3, [(11, 6), (6, 3), (3, 2)], 8, 32, 31, 4),
    (1, [(16, 20), (8, 10), (4, 5), (2, 3)], 4, 33, 9, 4),
    (2, [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)], 2, 7, 7, 1),
]
# float32 kernel against float64 PyTorch, relative to the largest output (the CPU kernel's tolerance).
OP_TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def library():
    path = openvino_build.load_openvino_extension()
    assert path is not None, f"dino's OpenVINO extension failed to build: {openvino_build.openvino_extension_failure()}"
    return path


def make_inputs(B, shapes, M, D, Q, P, seed=0):
    """float64 value (B, S, M, D), locations (B, Q, M, L, P, 2) with a 20% margin outside the map on each side,
    weights (B, Q, M, L, P), int32 spatial_shapes (L, 2) and level_start_index (L,)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int32)
    areas = spatial_shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]).to(torch.int32)
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64).softmax(-1)
    return value, spatial_shapes, starts, loc, attn


def op_model(tmp_path, spatial_shapes, starts, value_shape, loc_shape):
    """An OpenVINO model of one trt.plugins::DinoMSDeformAttn ONNX node (the plugin graph's node, shape tables as
    int32 initializers), converted with the extension as the export converts."""
    L = len(starts)
    node = helper.make_node("DinoMSDeformAttn", ["value", "spatial_shapes", "level_start_index", "loc", "attn"],
                            ["out"], domain="trt.plugins", plugin_version="1", plugin_namespace="")
    graph = helper.make_graph(
        [node], "msda",
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, list(value_shape)),
         helper.make_tensor_value_info("loc", TensorProto.FLOAT, list(loc_shape)),
         helper.make_tensor_value_info("attn", TensorProto.FLOAT, list(loc_shape[:-1]))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("spatial_shapes", TensorProto.INT32, [L, 2], spatial_shapes.flatten().tolist()),
                     helper.make_tensor("level_start_index", TensorProto.INT32, [L], starts.tolist())])
    path = tmp_path / "msda.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("trt.plugins", 1)]), str(path))
    return openvino_runtime.openvino().convert_model(str(path), extension=[openvino_runtime.extension_library(path)])


def run_op(model, precision, value, loc, attn):
    compiled = openvino_runtime.compile_cpu(model, precision, threads=2)
    feeds = {"value": value.float().numpy(), "loc": loc.float().numpy(), "attn": attn.float().numpy()}
    return compiled(feeds)[compiled.output(0)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{len(c[1])}M{c[2]}D{c[3]}Q{c[4]}P{c[5]}")
def test_op_matches_the_pytorch_path(case, library, tmp_path):
    value, shapes, starts, loc, attn = make_inputs(*case)
    B, _, M, D = value.shape
    model = op_model(tmp_path, shapes, starts, value.shape, loc.shape)
    assert [op.get_type_name() for op in model.get_ops()].count(openvino_build.OP_NAME) == 1
    assert model.output(0).get_partial_shape() == ov.PartialShape([B, loc.shape[1], M, D])  # shape inference
    got = run_op(model, "f32", value, loc, attn)
    ref = ms_deform_attn_pytorch(value, shapes.long(), starts.long(), loc, attn).view(got.shape).numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() / np.abs(ref).max() <= OP_TOLERANCE


def test_op_takes_a_dynamic_batch(library, tmp_path):
    """Shape inference keeps a symbolic batch (a --dynamic-batch IR); evaluate sizes the output per call."""
    value, shapes, starts, loc, attn = make_inputs(*CASES[2])
    model = op_model(tmp_path, shapes, starts, ["B", *value.shape[1:]], ["B", *loc.shape[1:]])
    assert model.output(0).get_partial_shape() == ov.PartialShape([-1, *loc.shape[1:3], value.shape[3]])
    for batch in (1, 3):
        got = run_op(model, "f32", value[:batch], loc[:batch], attn[:batch])
        ref = ms_deform_attn_pytorch(value[:batch], shapes.long(), starts.long(), loc[:batch], attn[:batch])
        assert np.abs(got - ref.view(got.shape).numpy()).max() / ref.abs().max().item() <= OP_TOLERANCE


@pytest.mark.skipif("BF16" not in openvino_runtime.cpu_capabilities(), reason="this CPU has no bf16 (OpenVINO "
                    "OPTIMIZATION_CAPABILITIES lacks BF16): needs avx512_bf16 or AMX")
def test_op_computes_in_float32_inside_a_bf16_graph(library, tmp_path):
    """Under the bf16 inference hint the CPU plugin runs the op (a Reference node) at f32, on f32 inputs: the same
    numbers as at the f32 hint, bit for bit."""
    value, shapes, starts, loc, attn = make_inputs(*CASES[2])
    model = op_model(tmp_path, shapes, starts, value.shape, loc.shape)
    compiled = openvino_runtime.compile_cpu(model, "bf16", threads=2)
    # The plugin runs an op it has no kernel of as a "Reference" node, calling the op's evaluate.
    (node,) = [op for op in compiled.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) == "Reference"]
    assert node.get_rt_info()["runtimePrecision"].astype(str) == "f32"
    np.testing.assert_array_equal(run_op(model, "bf16", value, loc, attn), run_op(model, "f32", value, loc, attn))


def test_op_refuses_a_level_outside_value(library, tmp_path):
    value, shapes, starts, loc, attn = make_inputs(*CASES[1])
    model = op_model(tmp_path, shapes, starts + 1, value.shape, loc.shape)  # the last level ends past S
    with pytest.raises(RuntimeError, match=r"level 1 \(5 x 7 from 131\) does not fit in value's 165 positions"):
        run_op(model, "f32", value, loc, attn)


def test_a_failed_build_is_one_line(monkeypatch):
    def broken(out):
        raise RuntimeError("c++ exited with 1: dino_msda_op.cpp:1: error: boom\nc++ -O3 ...\nmore output")

    monkeypatch.setattr(openvino_build, "_state", {})
    monkeypatch.setattr(openvino_build, "library_path", lambda: openvino_build.Path("/nonexistent/lib.so"))
    monkeypatch.setattr(openvino_build, "build_library", broken)
    monkeypatch.setattr(openvino_build, "FileLock", lambda path: contextlib.nullcontext())
    monkeypatch.delenv("DINO_OPENVINO_EXTENSION", raising=False)
    assert openvino_build.load_openvino_extension() is None
    assert openvino_build.openvino_extension_failure() == \
        "build failed: c++ exited with 1: dino_msda_op.cpp:1: error: boom"


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory, library):
    """``tiny_run``'s model exported by `dino export openvino` at 64x64 (checked as every export is), and what the
    command printed."""
    xml = tmp_path_factory.mktemp("openvino_extension") / "model.xml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["export", "openvino", "--recipe", TINY_RECIPE, "--checkpoint", str(tiny_run[0]), "--image-size",
                   *map(str, SIZE), "--output", str(xml)])
    assert rc == 0, out.getvalue()
    return xml, out.getvalue()


def test_export_with_the_extension_passes_its_check_and_records_the_extension(exported):
    xml, printed = exported
    assert any(line.startswith("OpenVINO CPU f32 batch 1: same query selection") for line in printed.splitlines())
    assert "GridSample" not in printed  # no fallback note
    assert openvino_runtime.needs_extension(xml)
    model = openvino_runtime.read_ir(xml)
    assert model.get_rt_info([openvino_runtime.EXTENSION_KEY]).astype(str) == openvino_build.OP_NAME
    types = [op.get_type_name() for op in model.get_ops()]
    assert types.count(openvino_build.OP_NAME) >= 2 and "GridSample" not in types  # encoder and decoder layers


@pytest.mark.skipif("BF16" not in openvino_runtime.cpu_capabilities(), reason="this CPU has no bf16 (OpenVINO "
                    "OPTIMIZATION_CAPABILITIES lacks BF16): needs avx512_bf16 or AMX")
def test_ir_with_the_extension_passes_the_bf16_check(exported, tiny_run):
    model, _ = build_deploy_model(TINY_RECIPE, tiny_run[0])
    (check,) = check_openvino(model, exported[0], SIZE, [1], "bf16")
    assert check.tolerance == BF16_TOLERANCE and check.query_score.value > 1e-6, check.line()


def test_predict_with_the_extension_gives_eager_predictions(exported, tiny_run, tmp_path, capsys):
    """64x64 images (the IR's canvas, no letterbox): the IR's detections are eager's within the float32 tolerance
    plus predictions.json's rounding (1e-4, 0.01 px)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("0.png", "1.png"):
        PIL.Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(folder / name)
    common = ["predict", str(folder), "--recipe", TINY_RECIPE, "--device", "cpu", "--score-threshold", "0"]
    assert main([*common, "--checkpoint", str(tiny_run[0]), "--output", str(tmp_path / "eager")]) == 0
    assert main([*common, "--openvino", str(exported[0]), "--output", str(tmp_path / "ov")]) == 0
    assert "OpenVINO IR" in capsys.readouterr().out

    def detections(folder):
        images = json.loads((folder / "predictions.json").read_text())["images"]
        return {r["file"].rsplit("/", 1)[-1]: r["detections"] for r in images}

    eager, got = detections(tmp_path / "eager"), detections(tmp_path / "ov")
    assert sorted(eager) == sorted(got) == ["0.png", "1.png"]
    score_tol, box_tol = FP32_TOLERANCE.score + 1e-4, FP32_TOLERANCE.box_px + 0.01
    for name, dets in got.items():
        assert len(dets) == len(eager[name]) > 0
        for det in dets:  # matched to the eager detection of its label that agrees best (near-ties may swap ranks)
            errors = [max(abs(e["score"] - det["score"]) / score_tol,
                          np.abs(np.subtract(e["box"], det["box"])).max() / box_tol)
                      for e in eager[name] if e["label"] == det["label"]]
            assert errors and min(errors) <= 1.0, (name, det, errors)


def _no_extension_here(monkeypatch, tmp_path):
    """This process as on a machine that cannot build the extension: no compiler, an empty build cache."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    monkeypatch.setenv("DINO_EXT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(openvino_build, "_state", {})
    monkeypatch.setattr(openvino_runtime, "_extension_core", [])


def test_ir_needing_the_extension_where_it_cannot_be_built_is_one_line(exported, tmp_path, monkeypatch, capsys):
    _no_extension_here(monkeypatch, tmp_path)
    (tmp_path / "images").mkdir()
    PIL.Image.new("RGB", SIZE).save(tmp_path / "images" / "0.png")
    rc = main(["predict", str(tmp_path / "images"), "--recipe", TINY_RECIPE, "--openvino", str(exported[0]),
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{exported[0]} needs dino's OpenVINO extension (op DinoMSDeformAttn), which is unavailable here: no C++ " \
           "compiler found" in err and "python -m dino.ops.openvino_build" in err


def test_export_where_the_extension_cannot_be_built_writes_the_gridsample_ir(tiny_run, tmp_path, monkeypatch,
                                                                           capsys):
    _no_extension_here(monkeypatch, tmp_path)
    xml = tmp_path / "model.xml"
    assert main(["export", "openvino", "--recipe", TINY_RECIPE, "--checkpoint", str(tiny_run[0]), "--image-size",
                 *map(str, SIZE), "--output", str(xml), "--no-verify"]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "OpenVINO extension" in line]
    assert len(notes) == 1 and "unavailable (no C++ compiler found" in notes[0] and "wrote the GridSample IR" in \
        notes[0], printed
    assert not openvino_runtime.needs_extension(xml)
    types = [op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ops()]
    assert "GridSample" in types and openvino_build.OP_NAME not in types
