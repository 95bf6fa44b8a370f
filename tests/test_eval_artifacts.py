"""`dino eval` / `dino.evaluate` on exported artifacts: an ONNX graph and an OpenVINO IR of the tiny model get eager's
predictions and AP and write the same files; bad arguments are one line, exit 2, before anything is written or
generated; a shapes dataset is generated only for a shapes recipe, with one line saying where."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import dino
from dino.errors import UserError
from dino_cli import main

from tests.conftest import TINY_RECIPE

# Measured 2026-12-08 on the 2-core Xeon VM (AMX, avx512_bf16): ONNX Runtime and OpenVINO f32 give the tiny model's
# 64x64 images (the artifact's canvas: no padding) scores within 7.1e-8 and boxes within 7.7e-6 px of eager's, and the
# same AP; the tolerances leave room for other CPUs' kernels.
SCORE_TOL, BOX_TOL, AP_TOL = 1e-5, 1e-3, 1e-4
OUTPUTS = ("results.json", "predictions.json", "pr_curves.png")


def _eval(flag: str, model, overrides, output: Path, capsys) -> tuple[dict, list[dict], str]:
    assert main(["eval", "--recipe", TINY_RECIPE, f"--{flag}", str(model), "--output-dir", str(output),
                 "--set", *overrides]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in output.iterdir() if not p.name.startswith(".")) == sorted(OUTPUTS)
    return (json.loads((output / "results.json").read_text()), json.loads((output / "predictions.json").read_text()),
            printed)


@pytest.fixture(scope="module")
def eager(tiny_run, tmp_path_factory):
    weights, overrides = tiny_run
    output = tmp_path_factory.mktemp("eval_eager") / "out"
    assert main(["eval", "--recipe", TINY_RECIPE, "--checkpoint", str(weights), "--output-dir", str(output),
                 "--set", *overrides]) == 0
    return (json.loads((output / "results.json").read_text()),
            json.loads((output / "predictions.json").read_text()))


def _by_image(predictions: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in predictions:
        out.setdefault(p["image_id"], []).append(p)
    return {k: sorted(v, key=lambda p: -p["score"]) for k, v in out.items()}


@pytest.mark.parametrize("flag,artifact", [("onnx", "tiny_onnx"), ("openvino", "tiny_openvino")])
def test_artifact_gets_eager_predictions_and_ap(flag, artifact, tiny_run, eager, request, tmp_path, capsys):
    results, predictions, printed = _eval(flag, request.getfixturevalue(artifact), tiny_run[1], tmp_path / "out",
                                          capsys)
    eager_results, eager_predictions = eager
    assert results["num_images"] == eager_results["num_images"] == 5
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert results[name] == pytest.approx(eager_results[name], abs=AP_TOL), name
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in printed and ", 64x64 canvas, on 5 images" in printed
    got, want = _by_image(predictions), _by_image(eager_predictions)
    assert sorted(got) == sorted(want)
    for image_id in want:
        # num_select (20) detections of each image, less those of label 0 (no category: not scored)
        assert len(got[image_id]) == len(want[image_id]) > 0
        for g, w in zip(got[image_id], want[image_id]):
            assert g["score"] == pytest.approx(w["score"], abs=SCORE_TOL)
            if abs(g["score"] - w["score"]) < SCORE_TOL and g["category_id"] == w["category_id"]:
                assert g["bbox"] == pytest.approx(w["bbox"], abs=BOX_TOL)


def test_python_api_evaluates_an_artifact(tiny_run, tiny_onnx, eager, tmp_path):
    stats = dino.evaluate(tiny_onnx, TINY_RECIPE, overrides=tiny_run[1], output_dir=tmp_path / "api")
    assert stats["num_images"] == 5 and set(stats["per_category"]) == {"rectangle", "ellipse", "triangle"}
    assert stats["AP"] == pytest.approx(eager[0]["AP"], abs=AP_TOL)
    assert sorted(p.name for p in (tmp_path / "api").iterdir() if not p.name.startswith(".")) == sorted(OUTPUTS)
    assert dino.evaluate(tiny_onnx, TINY_RECIPE, overrides=tiny_run[1], kind="onnx")["AP"] == stats["AP"]
    with pytest.raises(UserError, match=r"an exported artifact records its classes, not its dataset: give the recipe"):
        dino.evaluate(tiny_onnx)


@pytest.mark.parametrize("flags,message", [
    (["--onnx", "m.onnx", "--openvino", "m.xml"],
     "give exactly one model: --checkpoint / --onnx / --openvino / --aoti / --engine (got --onnx, --openvino)"),
    ([], "give exactly one model: --checkpoint / --onnx / --openvino / --aoti / --engine"),
    (["--checkpoint", "m.onnx"], "--checkpoint m.onnx is an exported ONNX graph: evaluate it with --onnx m.onnx"),
    (["--checkpoint", "m.xml"], "--checkpoint m.xml is an exported OpenVINO IR: evaluate it with --openvino m.xml"),
    (["--onnx", "missing.onnx"], "ONNX graph missing.onnx does not exist"),
    (["--checkpoint", "missing.safetensors"], "missing.safetensors"),
])
def test_bad_model_arguments_are_one_line_and_write_nothing(flags, message, tmp_path, monkeypatch, capsys):
    """Issue 35 item 13: `dino eval --checkpoint m.onnx` in an empty folder generated 580 files into ./data/shapes
    before refusing the file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"not a graph")
    (tmp_path / "m.xml").write_text("<net/>")
    assert main(["eval", "--recipe", "quickstart", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dino eval: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.xml"]


def test_unloadable_artifact_is_refused_before_the_data_is_generated(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"not a graph")
    data = tmp_path / "shapes"
    assert main(["eval", "--recipe", TINY_RECIPE, "--onnx", str(tmp_path / "m.onnx"), "--output-dir",
                 str(tmp_path / "out"), "--set", f"data.root={data}"]) == 2
    assert "ONNX Runtime cannot load" in capsys.readouterr().err
    assert not data.exists()


def test_shapes_data_is_generated_only_for_a_shapes_recipe_and_says_where(tiny_run, tmp_path, caplog):
    weights = tiny_run[0]
    with pytest.raises(UserError, match="annotations"):
        dino.evaluate(weights, TINY_RECIPE, overrides=["data.dataset=coco", f"data.root={tmp_path / 'coco'}"])
    assert not (tmp_path / "coco").exists()
    caplog.clear()
    stats = dino.evaluate(weights, TINY_RECIPE, overrides=[f"data.root={tmp_path / 'new'}"])
    assert stats["num_images"] == 5
    err = caplog.text
    assert ("generating the synthetic shapes dataset (8 train images of 64x64 px, 5 val images of 64x64 px, seed 0) "
            f"into {tmp_path / 'new'}") in err
    caplog.clear()
    dino.evaluate(weights, TINY_RECIPE, overrides=[f"data.root={tmp_path / 'new'}"])
    assert "generating" not in caplog.text  # there already: nothing generated, nothing said
