"""`dino predict` on real photos and folders (issue 20, issue 19): never writes over an input, reads images as a
viewer shows them (EXIF orientation, 16-bit grayscale, transparency, CMYK, float), skips and names the images the
model cannot take, names the pictures it cannot save, and gives an image the same detections whatever its batch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from dino.config import DataConfig
from dino.engine.recipe import load_recipe
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint
from dino.models.dino import build_model
from dino.predict.backend import ModelBackend
from dino.predict.detector import Detector
from dino.predict.files import predict_files
from dino.predict.preprocess import Preprocessor
from dino.predict.draw import MAX_DRAW_SIDE, draw_detections
from dino.predict.images import TRANSPARENT_BACKGROUND, to_rgb
from dino.predict.labels import LabelNames
from dino.weights import save_weights
from dino_cli import main

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
# Eval resizes images to a shorter side of 96 px (longer side at most 96) for the tiny recipe's model.
OVERRIDES = ["data.val_scale=96", "data.val_max_size=96"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_recipe(TINY, OVERRIDES)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("predict_inputs") / "model.safetensors"
    save_weights(build_model(cfg.model).state_dict(), path)
    return path


def _noise(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _predict(checkpoint, inputs, output, *extra, overrides=()):
    return main(["predict", *map(str, inputs), "--recipe", TINY, "--checkpoint", str(checkpoint), "--output",
                 str(output), "--device", "cpu", "--score-threshold", "0", "--max-detections", "5", *extra,
                 "--set", *OVERRIDES, *overrides])


def _records(output: Path) -> dict[str, dict]:
    return {Path(r["file"]).name: r for r in json.loads((output / "predictions.json").read_text())["images"]}


def _one_line_error(capsys, rc: int, text: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2 and text in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_an_output_folder_that_could_replace_an_input_is_refused(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _noise(64, 64).save(folder / "photo.jpg")
    original = (folder / "photo.jpg").read_bytes()
    rc = _predict(checkpoint, [folder], folder)
    _one_line_error(capsys, rc, f"--output {folder} holds the input {folder / 'photo.jpg'}")
    rc = _predict(checkpoint, [folder / "photo.jpg"], folder)  # the file alone: its picture would be photo.jpg too
    _one_line_error(capsys, rc, "holds the input")
    rc = _predict(checkpoint, [folder], folder / "predictions")  # a later run would read the outputs as inputs
    _one_line_error(capsys, rc, f"--output {folder / 'predictions'} is inside the input folder {folder}")
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, _predict(checkpoint, [folder], tmp_path / "file"), f"--output {tmp_path / 'file'} is a file")
    assert sorted(p.name for p in folder.iterdir()) == ["photo.jpg"]
    assert (folder / "photo.jpg").read_bytes() == original


def test_an_image_given_twice_gets_two_records_and_two_pictures(checkpoint, tmp_path):
    image = tmp_path / "cat.png"
    _noise(64, 64).save(image)
    assert _predict(checkpoint, [image, image, tmp_path / "cat.png"], tmp_path / "out") == 0
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert [r["picture"] for r in records] == ["cat.jpg", "cat_1.jpg", "cat_2.jpg"]
    assert all((tmp_path / "out" / r["picture"]).is_file() for r in records)
    assert records[0]["detections"] == records[1]["detections"] == records[2]["detections"]


def test_exif_orientation_is_applied_to_boxes_sizes_and_pictures(checkpoint, tmp_path):
    stored = _noise(48, 80)  # stored 80 wide, 48 high; orientation 6: shown rotated 90 degrees clockwise
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    stored.transpose(PIL.Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")  # what a viewer shows
    assert _predict(checkpoint, [tmp_path / "phone.png", tmp_path / "upright.png"], tmp_path / "out") == 0
    records = _records(tmp_path / "out")
    phone, upright = records["phone.png"], records["upright.png"]
    assert (phone["width"], phone["height"]) == (upright["width"], upright["height"]) == (48, 80)
    assert phone["detections"] == upright["detections"] and phone["detections"]
    with PIL.Image.open(tmp_path / "out" / phone["picture"]) as picture:
        assert picture.size == (480, 800)  # upright, enlarged to a shorter side of 480


def test_pixel_modes_are_converted_as_a_viewer_shows_them():
    sixteen = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    for image in (PIL.Image.fromarray(sixteen), PIL.Image.fromarray(sixteen.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]
    rgba = PIL.Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA")
    assert np.asarray(to_rgb(rgba))[0].tolist() == [list(TRANSPARENT_BACKGROUND), [0, 0, 0], [127, 127, 127]]
    assert TRANSPARENT_BACKGROUND == (255, 255, 255)
    la = PIL.Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(to_rgb(la))[0].tolist() == [[255, 255, 255], [10, 10, 10]]
    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 (black) is transparent
    assert np.asarray(to_rgb(palette))[0].tolist() == [[255, 255, 255], [200, 0, 0]]
    cmyk = PIL.Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0]))
    assert np.asarray(to_rgb(cmyk))[0].tolist() == [[255, 255, 255], [0, 255, 255]]
    unit = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    wide = PIL.Image.fromarray(np.array([[-3.0, 100.0, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255]
    assert to_rgb(PIL.Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_a_sixteen_bit_png_is_predicted_like_its_eight_bit_version(checkpoint, tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (64, 64)).astype(np.uint16)
    PIL.Image.fromarray(gray * 257).save(tmp_path / "deep.png")  # 16-bit grayscale PNG
    PIL.Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "gray.png")
    with PIL.Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode == "I;16"
    assert _predict(checkpoint, [tmp_path / "deep.png", tmp_path / "gray.png"], tmp_path / "out") == 0
    records = _records(tmp_path / "out")
    assert records["deep.png"]["detections"] == records["gray.png"]["detections"]


def test_images_the_model_cannot_take_are_named_and_skipped(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _noise(64, 64, 1).save(folder / "a.png")
    _noise(20, 4000, 2).save(folder / "b_strip.png")  # resizes to 96 x 0.48 px
    _noise(20, 1000, 3).save(folder / "c_narrow.png")  # at 64 px: 1 x 64 px, 13 encoder tokens for 20 queries
    _noise(48, 64, 4).save(folder / "d.png")
    output = tmp_path / "out"
    (output / "d.jpg").mkdir(parents=True)  # a folder in the way of d's picture: it cannot be saved
    rc = _predict(checkpoint, [folder], output, overrides=["data.val_scale=64", "data.val_max_size=64"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"skipped {folder / 'b_strip.png'}: 4000x20 px is too elongated for the model" in err
    assert f"skipped {folder / 'c_narrow.png'}: 1000x20 px: DINO: the image gives 13 encoder tokens" in err
    assert (f"dino predict: error: 2 file(s) skipped: {folder / 'b_strip.png'}, {folder / 'c_narrow.png'}; "
            f"1 picture(s) not saved (detections written): {folder / 'd.png'}") in err.splitlines()
    result = json.loads((output / "predictions.json").read_text())
    assert result["complete"] is True
    assert [Path(r["file"]).name for r in result["images"]] == ["a.png", "d.png"]
    assert [Path(f["file"]).name for f in result["failed"]] == ["b_strip.png", "c_narrow.png"]
    a, d = result["images"]
    assert (output / "a.jpg").is_file() and a["picture"] == "a.jpg" and len(a["detections"]) == 5
    assert d["picture"] is None and "not saved (IsADirectoryError" in d["picture_error"] and len(d["detections"]) == 5


def test_very_elongated_pictures_stay_within_the_jpeg_limit(tmp_path):
    image = torch.full((3, 20, 4000), 200, dtype=torch.uint8)
    drawn = draw_detections(image, torch.tensor([[10.0, 2.0, 3000.0, 18.0]]), [1], ["thing 0.50"])
    assert drawn.shape == (3, round(20 * MAX_DRAW_SIDE / 4000), MAX_DRAW_SIDE)  # was 480 x 96000: JPEG refused it
    PIL.Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp_path / "strip.jpg", quality=92)


def test_detections_do_not_depend_on_the_rest_of_the_batch(checkpoint, tmp_path):
    small, small_2, large = tmp_path / "a_small.png", tmp_path / "b_small.png", tmp_path / "c_large.png"
    _noise(48, 64, 1).save(small)  # resized to 72 x 96
    _noise(48, 64, 2).save(small_2)
    _noise(64, 64, 3).save(large)  # resized to 96 x 96: a shared batch would pad the small ones to 96 x 96
    for name, inputs in (("alone", [small]), ("alone_2", [small_2]), ("mixed", [small, large]),
                         ("same_size", [small, small_2, large])):
        assert _predict(checkpoint, inputs, tmp_path / name, "--batch-size", "3") == 0
    alone, alone_2 = _records(tmp_path / "alone")["a_small.png"], _records(tmp_path / "alone_2")["b_small.png"]
    # Padded to its neighbour's 96 x 96 (before the fix), a_small's top 5 changed: the label at rank 2, a box by
    # 64 px (resized pixels), scores by 0.0059. Now it runs alone, bit-identical.
    assert _records(tmp_path / "mixed")["a_small.png"] == {**alone, "file": str(small)}
    # Same-size images share a forward pass: equal up to float rounding (measured 3.8e-6 px, 1.3e-8 in score).
    same = _records(tmp_path / "same_size")
    for got, ref in ((same["a_small.png"], alone), (same["b_small.png"], alone_2)):
        assert [d["label"] for d in got["detections"]] == [d["label"] for d in ref["detections"]]
        torch.testing.assert_close(torch.tensor([d["box"] for d in got["detections"]]),
                                   torch.tensor([d["box"] for d in ref["detections"]]), atol=0.01, rtol=0)
        torch.testing.assert_close(torch.tensor([d["score"] for d in got["detections"]]),
                                   torch.tensor([d["score"] for d in ref["detections"]]), atol=1e-4, rtol=0)


def test_same_size_batch_equals_images_run_alone(checkpoint):
    cfg = load_recipe(TINY, OVERRIDES)
    backend = ModelBackend(build_model_from_checkpoint(cfg.model, checkpoint), cfg.model.num_select)
    pre = Preprocessor(cfg.data)
    pictures = [_noise(48, 64, seed) for seed in (1, 2)]
    together = backend.run(*pre(pictures)[:2])
    for i, picture in enumerate(pictures):
        alone = backend.run(*pre([picture])[:2])
        assert torch.equal(together[2][i], alone[2][0])
        torch.testing.assert_close(together[0][i], alone[0][0], atol=1e-4, rtol=0)  # measured 3.8e-6 px
        torch.testing.assert_close(together[1][i], alone[1][0], atol=1e-6, rtol=0)  # measured 1.3e-8


def test_predict_files_refuses_an_output_folder_holding_an_input(tmp_path):
    _noise(64, 64).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="holds the input"):
        predict_files(Detector(ModelBackend(torch.nn.Identity(), 1), DataConfig(), LabelNames.build(3, None)),
                      [tmp_path / "a.png"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_an_earlier_run_s_outputs_are_not_read_as_inputs(checkpoint, tmp_path, capsys):
    first = tmp_path / "first"
    _noise(64, 64).save(tmp_path / "cat.png")
    assert _predict(checkpoint, [tmp_path / "cat.png"], first) == 0
    _noise(64, 64, 5).save(first / "dog.png")  # a new photo put in the earlier output folder
    assert _predict(checkpoint, [first], tmp_path / "second") == 0
    err = capsys.readouterr().err
    assert f"{first} holds an earlier run's outputs: left out its predictions.json and the 1 picture(s)" in err
    assert list(_records(tmp_path / "second")) == ["dog.png"]


def test_a_folder_gives_its_image_files_and_a_named_text_file_stays_an_error(checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _noise(64, 64).save(photos / "a.png")
    (photos / "readme.txt").write_text("holiday photos")
    assert _predict(checkpoint, [photos], tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert f"{photos}: left out 1 file(s) that are not images by their name (readme.txt)" in err
    assert list(_records(tmp_path / "out")) == ["a.png"]
    # Named explicitly, the text file is still tried, and fails.
    assert _predict(checkpoint, [photos / "readme.txt"], tmp_path / "out2") == 1
    assert "readme.txt: not a readable image" in capsys.readouterr().err
    (photos / "a.png").unlink()
    _one_line_error(capsys, _predict(checkpoint, [photos], tmp_path / "out3"),
                    f"input folder {photos} holds no image files (only 1 other file(s))")
