"""OpenVINO IR export: `dino export openvino` of a tiny DINO writes model.xml + model.bin checked query by query
against PyTorch at f32, records its precision and classes, `dino predict --openvino` gives eager's predictions, and a
wrong IR fails the same check naming the largest difference."""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import textwrap

import numpy as np
import openvino as ov
import PIL.Image
import pytest
import torch

import dino
from dino.errors import UserError
from dino.predict import openvino_runtime
from dino.predict.artifacts import OpenVinoBackend
from dino.weights import save_weights
from dino_cli import main
from dino_export import openvino_export
from dino_export.deploy_model import build_deploy_model
from dino_export.openvino_export import check_openvino, export_openvino, weights_path
from dino_export.query_check import FP32_TOLERANCE, ExportCheckError, GraphDisagrees

SIZE = (64, 64)
CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 1-encoder, 1-decoder quickstart DINO (random weights, seed 0) exported at 64x64 through the CLI; its recipe
    resizes images for evaluation to 64 px, as the quickstart's."""
    root = tmp_path_factory.mktemp("openvino")
    recipe = root / "tiny.py"
    recipe.write_text(textwrap.dedent("""
        from dino.config import DataConfig, Recipe
        from dino.presets import get_preset

        def recipe():
            model = get_preset("dino_quickstart")
            model.transformer.enc_layers, model.transformer.dec_layers, model.transformer.num_queries = 1, 1, 20
            model.num_select = 10
            return Recipe(name="tiny", model=model, data=DataConfig(val_scale=64, val_max_size=64))
    """))
    from dino.engine.recipe import load_recipe

    torch.manual_seed(0)
    checkpoint = root / "model.safetensors"
    save_weights(dino.build_model(load_recipe(str(recipe)).model).state_dict(), checkpoint,
                 {"categories": json.dumps(CATEGORIES)})
    xml = root / "out" / "model.xml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["export", "openvino", "--recipe", str(recipe), "--checkpoint", str(checkpoint), "--image-size",
                   *map(str, SIZE), "--output", str(xml)])
    assert rc == 0, out.getvalue()
    return recipe, checkpoint, xml, out.getvalue()


def test_export_checks_onnx_then_openvino_and_writes_an_f32_ir_with_its_classes(exported):
    recipe, checkpoint, xml, out = exported
    lines = out.splitlines()
    onnx_line = next(line for line in lines if line.startswith("ONNX Runtime CPU batch 1: "))
    ov_line = next(line for line in lines if line.startswith("OpenVINO CPU f32 batch 1: "))
    # Judged as the ONNX graph is: against PyTorch float64, at a tolerance scaled to PyTorch float32's distance.
    for line in (onnx_line, ov_line):
        assert "per query: max |score| diff" in line and "judged against PyTorch float64" in line
    assert lines.index(onnx_line) < lines.index(ov_line) < len(lines) - 1
    assert lines[-1].startswith(f"wrote {xml} and {weights_path(xml)}") and "precision f32" in lines[-1]
    assert sorted(p.name for p in xml.parent.iterdir()) == ["model.bin", "model.xml"]  # no temporary folder left
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (xml, weights_path(xml)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    model = openvino_runtime.read_ir(xml)
    assert [i.get_any_name() for i in model.inputs] == ["images", "mask"]
    assert [o.get_any_name() for o in model.outputs] == ["boxes", "scores", "labels"]
    assert model.inputs[0].get_partial_shape() == ov.PartialShape([1, 3, *SIZE])  # static batch 1
    assert openvino_runtime.recorded_precision(model, xml) == "f32"
    assert openvino_runtime.read_metadata(model, ("dino.num_classes", "dino.categories")) == {
        "dino.num_classes": "4", "dino.categories": json.dumps(CATEGORIES)}
    # Weights kept in float32 (compress_to_fp16=False): no float16 constant anywhere.
    assert not [op for op in model.get_ops() if op.get_type_name() == "Constant"
                and op.get_output_element_type(0) == ov.Type.f16]


def _prediction_sets(folder):
    return {r["file"].rsplit("/", 1)[-1]: r for r in json.loads((folder / "predictions.json").read_text())["images"]}


def test_predict_openvino_gives_eager_predictions(exported, tmp_path, capsys):
    """Square images of three sizes, each resized to the 64x64 canvas (letterboxed inputs are the check's): the IR's
    detections are PyTorch's, each matched to the eager detection of the same label that agrees best (near-tied
    scores may swap ranks), within the float32 tolerance plus predictions.json's rounding (1e-4, 0.01 px)."""
    recipe, checkpoint, xml, _ = exported
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sides = {"0.png": 48, "1.png": 64, "2.png": 100}
    for name, side in sides.items():
        PIL.Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / name)
    common = ["predict", str(folder), "--recipe", str(recipe), "--device", "cpu", "--score-threshold", "0"]
    assert main([*common, "--checkpoint", str(checkpoint), "--output", str(tmp_path / "eager")]) == 0
    assert main([*common, "--openvino", str(xml), "--output", str(tmp_path / "ov")]) == 0
    assert "OpenVINO IR" in capsys.readouterr().out
    eager, got = _prediction_sets(tmp_path / "eager"), _prediction_sets(tmp_path / "ov")
    assert sorted(eager) == sorted(got) == sorted(sides)
    for name, record in got.items():
        expected = eager[name]["detections"]
        score_tol = FP32_TOLERANCE.score + 1e-4
        box_tol = FP32_TOLERANCE.box_px * sides[name] / SIZE[0] + 0.01  # pixels of the original image
        assert len(record["detections"]) == len(expected) == 10
        assert np.abs(np.sort([d["score"] for d in record["detections"]]) -
                      np.sort([d["score"] for d in expected])).max() <= score_tol
        for det in record["detections"]:
            same = [e for e in expected if e["label"] == det["label"]]
            errors = [max(abs(e["score"] - det["score"]) / score_tol,
                          np.abs(np.subtract(e["box"], det["box"])).max() / box_tol) for e in same]
            assert same and min(errors) <= 1.0, (name, det, errors)


def _with_first_conv_perturbed(xml):
    """The IR with one number of the backbone's first convolution changed by 1, as a corrupt file would have."""
    model = openvino_runtime.read_ir(xml)
    const = next(op for op in model.get_ops() if op.get_type_name() == "Constant"
                 and "conv1.weight" in op.get_friendly_name() and op.get_output_element_type(0) == ov.Type.f32)
    values = const.get_data().copy()
    values.flat[0] += 1.0
    const.output(0).replace(ov.opset13.constant(values).output(0))
    return model


def test_perturbed_ir_fails_the_check_naming_the_largest_difference(exported):
    recipe, checkpoint, xml, _ = exported
    model, _ = build_deploy_model(str(recipe), checkpoint)
    (check,) = check_openvino(model, xml, SIZE, [1])  # the IR as written passes
    assert check.query_score.value <= check.tolerance.score <= FP32_TOLERANCE.score
    with pytest.raises(GraphDisagrees, match=r"OpenVINO CPU f32 disagrees with PyTorch float64 \(batch 1\): largest "
                                               r"difference: (query selection score|per-query score|per-query box) "
                                               r"[0-9.e+-]+( px)? at image 0, query \d+"):
        check_openvino(model, _with_first_conv_perturbed(xml), SIZE, [1])


def test_failed_check_leaves_the_previous_ir_and_no_temporary_files(exported, tmp_path, monkeypatch):
    recipe, checkpoint, xml, _ = exported
    model, _ = build_deploy_model(str(recipe), checkpoint)
    output = tmp_path / "m.xml"
    output.write_bytes(b"previous xml")
    weights_path(output).write_bytes(b"previous bin")

    class _CheckedOnnx:  # stands in for the (slow, already tested) ONNX export: the IR comes from `exported`
        checks: list = []
        path = None

    monkeypatch.setattr(openvino_export, "export_onnx", lambda *args, **kwargs: _CheckedOnnx())
    monkeypatch.setattr(openvino_export, "convert_onnx", lambda path: _with_first_conv_perturbed(xml))
    with pytest.raises(ExportCheckError, match="OpenVINO CPU f32 disagrees with PyTorch"):
        export_openvino(model, output, SIZE)
    assert output.read_bytes() == b"previous xml" and weights_path(output).read_bytes() == b"previous bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]


def test_bf16_on_a_cpu_without_it_is_refused_before_exporting(exported, tmp_path, monkeypatch, capsys):
    """OpenVINO itself compiles a bf16 hint to f32 without a word on such CPUs; the export refuses, writes nothing."""
    recipe, checkpoint, _, _ = exported
    monkeypatch.setattr(openvino_runtime, "cpu_capabilities", lambda: ["FP32", "INT8"])
    output = tmp_path / "bf16.xml"
    rc = main(["export", "openvino", "--recipe", str(recipe), "--checkpoint", str(checkpoint), "--image-size",
               *map(str, SIZE), "--precision", "bf16", "--output", str(output)])
    err = capsys.readouterr().err
    assert rc == 2 and "--precision bf16: this CPU has no BF16 (OpenVINO CPU capabilities: FP32, INT8)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif("BF16" not in openvino_runtime.cpu_capabilities(), reason="this CPU has no bf16 (OpenVINO "
                    "OPTIMIZATION_CAPABILITIES lacks BF16): needs avx512_bf16 or AMX")
def test_bf16_ir_passes_the_check_at_the_bf16_tolerance_and_differs_from_f32(exported):
    recipe, checkpoint, xml, _ = exported
    model, _ = build_deploy_model(str(recipe), checkpoint)
    (check,) = check_openvino(model, xml, SIZE, [1], "bf16")
    assert check.tolerance == openvino_export.BF16_TOLERANCE and check.query_score.value > 1e-6, check.line()


def test_predict_openvino_refuses_bad_files_in_one_line(exported, tmp_path):
    _, _, xml, _ = exported
    with pytest.raises(UserError, match="OpenVINO IR .*nope.xml does not exist"):
        OpenVinoBackend(tmp_path / "nope.xml")
    with pytest.raises(UserError, match="give the IR's .xml file"):
        OpenVinoBackend(weights_path(xml))
    corrupt = tmp_path / "corrupt.xml"
    corrupt.write_text("<net>")
    with pytest.raises(UserError, match="OpenVINO cannot read .*corrupt.xml"):
        OpenVinoBackend(corrupt)
    other = tmp_path / "other.xml"  # an IR recording a precision this version does not run
    model = openvino_runtime.read_ir(xml)
    model.set_rt_info("f16", [openvino_runtime.PRECISION_KEY])
    ov.save_model(model, str(other), compress_to_fp16=False)
    with pytest.raises(UserError, match="other.xml: unknown dino.precision 'f16'"):
        OpenVinoBackend(other)
