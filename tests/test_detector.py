"""The Python API: dino.Detector equals `dino predict` (eager and ONNX), takes every image form alike, applies EXIF
orientation, does not depend on the batch, draws as `dino predict` does, and refuses files it cannot use in one line;
dino.evaluate equals `dino eval`; dino_export.export writes what Detector.load runs; public names have docstrings."""
from __future__ import annotations

import inspect
import io
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import dino
import dino_export
from dino.engine.recipe import load_recipe
from dino.errors import UserError
from dino.models.dino import build_model
from dino.weights import save_weights
from dino_cli import main

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
KEEP_ALL = {"score_threshold": 0.0, "max_detections": 10}


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A training run's folder as training leaves it (final weights and a checkpoint folder, both recording their
    recipe and categories) for the tiny recipe on its 64 px shapes validation images (random weights, seed 0): the
    session's ``tiny_run`` weights (tests/conftest.py), copied, so the ONNX graph ``tiny_onnx`` holds the same model."""
    weights, overrides = tiny_run
    cfg = load_recipe(TINY, overrides)
    folder = tmp_path_factory.mktemp("detector") / "run"
    step = folder / "checkpoints" / "step_00000004_end"
    step.mkdir(parents=True)
    shutil.copy(weights, folder / "model.safetensors")
    shutil.copy(weights, step / "model.safetensors")
    images = sorted((Path(cfg.data.root) / cfg.data.val_images).iterdir())
    return folder, images, cfg


@pytest.fixture(scope="module")
def detector(run):
    return dino.Detector.load(run[0], device="cpu")


@pytest.fixture(scope="module")
def onnx_graph(tiny_onnx):
    """``run``'s model as a 64x64 ONNX graph: the session's ``tiny_onnx``, exported once from the same weights."""
    return tiny_onnx


def _cli_predictions(inputs, output, *flags) -> dict:
    assert main(["predict", *map(str, inputs), "--output", str(output), "--device", "cpu", "--score-threshold", "0",
                 "--max-detections", "10", "--batch-size", "3", *map(str, flags)]) == 0
    return json.loads((output / "predictions.json").read_text())


def _assert_api_equals_cli(results, predictions, images) -> None:
    assert [Path(r["file"]).name for r in predictions["images"]] == [p.name for p in images]
    for result, record in zip(results, predictions["images"]):
        assert result.to_dict() == {k: record[k] for k in ("width", "height", "detections")}
        assert len(result) == len(record["detections"]) > 0
        torch.testing.assert_close(result.boxes, torch.tensor([d["box"] for d in record["detections"]]),
                                   atol=0.005, rtol=0)  # the file rounds to 2 decimals
        assert result.labels.tolist() == [d["label"] for d in record["detections"]]
        assert result.names == [d["name"] for d in record["detections"]]


def test_eager_detections_equal_dino_predict_s_predictions_json(run, detector, tmp_path, capsys):
    folder, images, _ = run
    predictions = _cli_predictions([images[0].parent], tmp_path / "out", "--checkpoint", folder)  # recipe recorded
    assert f"using {folder / 'model.safetensors'}" in capsys.readouterr().err
    assert predictions["backend"] == "pytorch"
    assert predictions["model"] == f"engine_tiny, weights {folder}/model.safetensors"
    _assert_api_equals_cli(detector(images, **KEEP_ALL), predictions, images)
    names = {d["name"] for r in predictions["images"] for d in r["detections"]}
    assert names <= {"rectangle", "ellipse", "triangle", "class 0"} and names & {"rectangle", "ellipse", "triangle"}


GOLDEN = Path(__file__).resolve().parent / "fixtures" / "predict" / "tiny_predictions.json"


def test_predictions_json_is_unchanged(run, tmp_path):
    """``predictions.json`` of the `run` model on its validation folder plus one image again, pinned to the file the
    code before dino.Detector wrote for the same model (byte-identical here on 2026-12-07, this file; tolerances
    below only absorb float differences between CPUs)."""
    folder, images, cfg = run
    got = _cli_predictions([images[0].parent, images[1]], tmp_path / "out", "--recipe", TINY,
                           "--checkpoint", folder / "model.safetensors")
    want = json.loads(GOLDEN.read_text())
    root = Path(cfg.data.root).parent
    assert list(got) == list(want) and got["model"] == f"engine_tiny, weights {folder / 'model.safetensors'}"
    assert {k: got[k] for k in ("backend", "score_threshold", "max_detections", "complete", "failed")} == \
        {k: want[k] for k in ("backend", "score_threshold", "max_detections", "complete", "failed")}
    assert [str(Path(r["file"]).relative_to(root)) for r in got["images"]] == [r["file"] for r in want["images"]]
    for a, b in zip(got["images"], want["images"]):
        assert list(a) == list(b) and [list(d) for d in a["detections"]] == [list(d) for d in b["detections"]]
        assert {k: a[k] for k in ("picture", "width", "height")} == {k: b[k] for k in ("picture", "width", "height")}
        for key in ("label", "category_id", "name"):
            assert [d[key] for d in a["detections"]] == [d[key] for d in b["detections"]]
        torch.testing.assert_close(torch.tensor([d["box"] for d in a["detections"]]),
                                   torch.tensor([d["box"] for d in b["detections"]]), atol=0.02, rtol=0)
        torch.testing.assert_close(torch.tensor([d["score"] for d in a["detections"]]),
                                   torch.tensor([d["score"] for d in b["detections"]]), atol=2e-4, rtol=0)


def test_onnx_detections_equal_dino_predict_s_predictions_json(run, onnx_graph, tmp_path):
    folder, images, _ = run
    predictions = _cli_predictions(images, tmp_path / "out", "--onnx", onnx_graph, "--checkpoint", folder)
    assert predictions["backend"] == "onnxruntime"
    api = dino.Detector.load(onnx_graph, checkpoint=folder, device="cpu")
    assert api.backend.input_size == (64, 64)
    _assert_api_equals_cli(api(images, **KEEP_ALL), predictions, images)


def test_numpy_pil_tensor_and_path_of_one_image_give_the_same_result(run, detector):
    path = run[1][0]
    with PIL.Image.open(path) as image:
        pil = image.convert("RGB")
    array = np.array(pil)
    forms = [path, str(path), pil, array, torch.from_numpy(array).permute(2, 0, 1),
             torch.from_numpy(array).permute(2, 0, 1).float() / 255]
    results = [detector(form, **KEEP_ALL).to_dict() for form in forms]
    assert results[0]["detections"] and all(r == results[0] for r in results)


def test_an_exif_rotated_jpeg_gives_its_upright_detections(detector, tmp_path):
    stored = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    with PIL.Image.open(tmp_path / "phone.jpg") as opened:
        opened.load()
        decoded = np.asarray(opened.convert("RGB"))  # the stored pixels, 80 wide
        from_pil = detector(opened, **KEEP_ALL)
    upright = np.ascontiguousarray(np.rot90(decoded, k=-1))  # what a viewer shows: 48 wide, 80 high
    result = detector(tmp_path / "phone.jpg", **KEEP_ALL)
    assert (result.width, result.height) == (48, 80)
    assert result.to_dict() == detector(upright, **KEEP_ALL).to_dict() == from_pil.to_dict()
    assert result.to_dict() != detector(decoded, **KEEP_ALL).to_dict()


def test_a_batch_gives_each_image_its_single_image_result(run, detector):
    images = run[1]
    wide = np.random.default_rng(2).integers(0, 255, (40, 72, 3), dtype=np.uint8)  # resized to another size
    batch = [images[0], wide, images[1], images[2], wide[:, :50]]
    together = detector(batch, batch_size=2, **KEEP_ALL)
    for image, result in zip(batch, together):
        alone = detector(image, **KEEP_ALL)
        assert result.to_dict() == alone.to_dict()
    assert isinstance(detector(images[0]), dino.Detections) and isinstance(detector([images[0]]), list)


def test_draw_is_dino_predict_s_picture(run, detector, tmp_path):
    folder, images, _ = run
    predictions = _cli_predictions(images[:2], tmp_path / "out", "--checkpoint", folder)
    for path, record in zip(images[:2], predictions["images"]):
        drawn = detector(path, **KEEP_ALL).draw(path)
        assert drawn.size == (480, 480)  # enlarged as dino predict draws 64 px images
        buffer = io.BytesIO()
        drawn.save(buffer, format="JPEG", quality=92)
        assert buffer.getvalue() == (tmp_path / "out" / record["picture"]).read_bytes()
    with pytest.raises(UserError, match="these detections are of a 64x64 image"):
        detector(images[0]).draw(np.zeros((10, 20, 3), np.uint8))


def _one_line(err: UserError, *texts: str) -> None:
    message = str(err)
    assert "\n" not in message and all(text in message for text in texts), message


def test_load_refuses_a_file_it_cannot_use_in_one_line(run, tmp_path):
    folder = run[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = tmp_path / "bare.safetensors"
    save_weights(build_model(run[2].model).state_dict(), bare)  # no recipe recorded
    cases = [
        (notes, ("notes.txt", "not a file dino can run", ".onnx")),
        (garbage, ("model.safetensors", "not a readable safetensors file")),
        (tmp_path / "missing.onnx", ("missing.onnx", "does not exist")),
        (empty, ("empty is a folder without model.safetensors",)),
        (bare, ("bare.safetensors", "does not record the recipe", "--recipe")),
        (folder / "checkpoints", ("is a folder without model.safetensors",)),
    ]
    for path, texts in cases:
        with pytest.raises(UserError) as err:
            dino.Detector.load(path, device="cpu")
        _one_line(err.value, *texts)
    with pytest.raises(UserError) as err:
        dino.Detector.load(bare, recipe="no_such_recipe")
    _one_line(err.value, "no recipe named 'no_such_recipe'")
    with pytest.raises(UserError) as err:
        dino.Detector.load(folder, device="cpu")(tmp_path / "notes.txt")
    _one_line(err.value, "notes.txt: not a readable image")


def test_a_checkpoint_folder_is_taken_and_named(run, detector, capsys):
    folder, images, _ = run
    step = folder / "checkpoints" / "step_00000004_end"
    from_step = dino.Detector.load(step, device="cpu")
    assert f"checkpoint {step} is a folder: using {step / 'model.safetensors'}" in capsys.readouterr().err
    assert from_step(images[0], **KEEP_ALL).to_dict() == detector(images[0], **KEEP_ALL).to_dict()
    assert from_step.description == f"engine_tiny, weights {step / 'model.safetensors'}"


def test_evaluate_returns_dino_eval_s_metrics(run, tmp_path):
    folder, _, cfg = run
    assert main(["eval", "--recipe", TINY, "--checkpoint", str(folder), "--output-dir", str(tmp_path / "cli"),
                 "--set", f"data.root={cfg.data.root}"]) == 0
    # The recipe recorded in the checkpoint, but not its data.root: nothing read from a file may name a file.
    stats = dino.evaluate(folder, overrides=[f"data.root={cfg.data.root}"])
    written = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert {k: stats[k] for k in written} == written
    assert set(stats) >= {"AP", "AP50", "per_category", "num_images"} and stats["num_images"] == 5


def test_every_public_name_has_a_docstring_with_shapes_or_units():
    def documented(obj) -> str:
        return inspect.getdoc(obj) or ""

    assert set(dino.__all__) >= {"Detector", "Detections", "evaluate", "build_model"}
    names = [getattr(dino, n) for n in dino.__all__ if n != "__version__"] + [dino_export.export]
    for obj in names:
        assert documented(obj), obj
    members = [dino.Detector.load, dino.Detector.__call__, dino.Detector.detect_pictures, dino.Detections.to_dict,
               dino.Detections.draw]
    for member in members:
        assert documented(member), member
    # Shapes and units where tensors or pixels are involved.
    for obj in (dino.Detections, dino.Detector.__call__, dino.Detector.load, dino_export.export):
        text = documented(obj)
        assert any(unit in text for unit in ("(N, 4)", "(H, W", "pixels", "px")), obj


def test_export_and_bench_take_a_run_folder_and_name_the_file(run, tmp_path, capsys):
    folder, _, cfg = run
    assert main(["bench", "--recipe", TINY, "--checkpoint", str(folder), "--backends", "eager_fp32", "--device", "cpu",
                 "--warmup", "0", "--iters", "1", "--image-size", "64", "64"]) == 0
    out = capsys.readouterr()
    assert f"checkpoint {folder} is a folder: using {folder / 'model.safetensors'}" in out.err
    assert "weights model.safetensors" in out.out
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["export", "onnx", "--recipe", TINY, "--checkpoint", str(empty), "--image-size", "64", "64",
                 "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {empty} is a folder without model.safetensors" in err and len(err.strip().splitlines()) == 1
