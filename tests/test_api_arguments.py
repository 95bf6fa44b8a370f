"""The Python API validates as the CLI does (issue 35, items 11 and 12): every bad argument of ``Detector.load``,
``Detector.__call__``, ``dino.evaluate`` and ``dino_export.export`` is a ``dino.errors.UserError`` naming it (an
``ArgumentTypeError``, also a TypeError, for a wrong type), before any work; float tensor images outside [0, 1] or
with NaN are refused, not clamped; URLs are refused as URLs, never read."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dino
import dino_export
import dino_export.export_model
from dino.engine.recipe import load_recipe
from dino.engine.setup import weights_metadata
from dino.errors import ArgumentTypeError, UserError
from dino.models.dino import build_model
from dino.weights import save_weights

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]
URL_REFUSED = "URLs are not read \\(the project never uses the network\\): download the file first"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_arguments")
    cfg = load_recipe(TINY, [f"data.root={root / 'shapes'}"])
    path = root / "model.safetensors"
    torch.manual_seed(0)
    save_weights(build_model(cfg.model).state_dict(), path, weights_metadata(cfg, CATEGORIES))
    return path


@pytest.fixture(scope="module")
def detector(checkpoint):
    return dino.Detector.load(checkpoint, device="cpu")


IMAGE = torch.full((3, 64, 64), 0.5)

CALLS = [  # (keyword arguments of det(IMAGE, ...), error type, message)
    ({"score_threshold": "0.5"}, ArgumentTypeError, "score_threshold must be a number in \\[0, 1\\], got str '0.5'"),
    ({"score_threshold": None}, ArgumentTypeError, "score_threshold must be a number in \\[0, 1\\], got NoneType"),
    ({"score_threshold": float("nan")}, UserError, "score_threshold must be in \\[0, 1\\], got nan"),
    ({"score_threshold": 1.5}, UserError, "score_threshold must be in \\[0, 1\\], got 1.5"),
    ({"max_detections": 2.5}, ArgumentTypeError, "max_detections must be an integer, got float 2.5"),
    ({"max_detections": 0}, UserError, "max_detections must be >= 1, got 0"),
    ({"batch_size": None}, ArgumentTypeError, "batch_size must be an integer, got NoneType None"),
    ({"batch_size": True}, ArgumentTypeError, "batch_size must be an integer, got bool True"),
]


@pytest.mark.parametrize("kwargs, error, message", CALLS, ids=[str(c[0]) for c in CALLS])
def test_detector_call_arguments(detector, kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        detector(IMAGE, **kwargs)
    assert isinstance(info.value, UserError)


def test_a_wrong_type_is_also_a_type_error(detector):
    with pytest.raises(TypeError):
        detector(IMAGE, score_threshold="0.5")


IMAGES = [  # (image, message)
    (torch.full((3, 64, 64), 200.0),
     "float values must be in \\[0, 1\\] .* got 200..200; divide a 0..255 image by 255"),
    (torch.full((3, 64, 64), -0.5), "float values must be in \\[0, 1\\]"),
    (torch.full((3, 64, 64), float("nan")), "holds NaN or infinite values"),
    (torch.tensor([[[float("inf")]]]).expand(3, 64, 64), "holds NaN or infinite values"),
    ("http://example.com/cat.jpg", f"image http://example.com/cat.jpg: {URL_REFUSED}"),
]


@pytest.mark.parametrize("image, message", IMAGES, ids=["0..255 float", "negative", "nan", "inf", "url"])
def test_images_that_would_be_misread_are_refused(detector, image, message):
    with pytest.raises(UserError, match=message):
        detector(image)


def test_float_images_in_the_unit_range_still_work(detector):
    assert detector(IMAGE, score_threshold=0.0).width == 64


LOADS = [  # (keyword arguments of Detector.load(checkpoint, ...), error type, message)
    ({"image_size": 64}, ArgumentTypeError, "image_size must be \\(H, W\\), two positive integers in pixels; got 64"),
    ({"image_size": (64.5, 64)}, ArgumentTypeError, "image_size height must be an integer, got float 64.5"),
    ({"image_size": ("64", "64")}, ArgumentTypeError, "image_size height must be an integer, got str '64'"),
    ({"overrides": "data.val_scale=64"}, ArgumentTypeError,
     "overrides must be a list of 'section.field=value' strings, got the string 'data.val_scale=64'; write "
     "overrides=\\['data.val_scale=64'\\]"),
    ({"kind": "tflite"}, UserError, "kind must be one of 'onnx', 'openvino', 'aoti', 'engine', got 'tflite'"),
    ({"plugin_libs": "lib.so"}, ArgumentTypeError, "plugin_libs must be a list of paths, got str 'lib.so'"),
    ({"recipe": 3}, ArgumentTypeError, "recipe must be a Recipe, a recipe name or file, or None; got int 3"),
    ({"device": 0}, ArgumentTypeError, "device must be a str such as 'cpu' or 'cuda', or a torch.device; got int 0"),
    ({"checkpoint": 1.0}, ArgumentTypeError, "checkpoint must be a path \\(str or os.PathLike\\), got float 1.0"),
]


@pytest.mark.parametrize("kwargs, error, message", LOADS, ids=[str(c[0]) for c in LOADS])
def test_detector_load_arguments(checkpoint, kwargs, error, message):
    with pytest.raises(error, match=message):
        dino.Detector.load(checkpoint, **kwargs)


@pytest.mark.parametrize("path", ["http://example.com/model.safetensors", "https://example.com/run/",
                                  "s3://bucket/model.onnx"])
def test_detector_load_refuses_a_url_as_a_url(path):
    with pytest.raises(UserError, match=f"^path {path}: {URL_REFUSED}"):
        dino.Detector.load(path)


def test_detector_load_refuses_a_path_of_the_wrong_type():
    with pytest.raises(ArgumentTypeError, match="path must be a path \\(str or os.PathLike\\), got NoneType None"):
        dino.Detector.load(None)


EVALUATES = [  # (args, kwargs, error, message)
    ((42,), {}, ArgumentTypeError, "must be a path \\(str or os.PathLike\\), got int 42"),
    (("http://example.com/m.safetensors",), {}, UserError, URL_REFUSED),
    (("{ckpt}",), {"overrides": "data.root=/data"}, ArgumentTypeError, "overrides must be a list of"),
    (("{ckpt}",), {"output_dir": 5}, ArgumentTypeError, "output_dir must be a path"),
    (("{ckpt}",), {"recipe": ["quickstart"]}, ArgumentTypeError, "recipe must be a Recipe"),
]


@pytest.mark.parametrize("args, kwargs, error, message", EVALUATES, ids=[str(e[0]) + str(e[1]) for e in EVALUATES])
def test_evaluate_arguments(checkpoint, args, kwargs, error, message):
    args = tuple(a.format(ckpt=checkpoint) if isinstance(a, str) else a for a in args)
    with pytest.raises(error, match=message):
        dino.evaluate(*args, **kwargs)


def test_evaluate_refuses_an_output_dir_whose_results_would_replace_the_checkpoint(tmp_path):
    weights = tmp_path / "results.json"  # a checkpoint under the name of an evaluation output
    weights.write_bytes(b"weights")
    with pytest.raises(UserError, match=f"output_dir {tmp_path}: its results.json would replace the input"):
        dino.evaluate(weights, output_dir=tmp_path)
    assert weights.read_bytes() == b"weights"


EXPORTS = [  # (keyword arguments of dino_export.export(checkpoint, ...), error type, message)
    ({"format": "tflite"}, UserError, "format must be one of 'onnx', 'aoti', got 'tflite'"),
    ({"image_size": 64}, ArgumentTypeError, "image_size must be \\(H, W\\)"),
    ({"image_size": (64.5, 64)}, ArgumentTypeError, "image_size height must be an integer, got float 64.5"),
    ({"image_size": ("64", "64")}, ArgumentTypeError, "image_size height must be an integer, got str '64'"),
    ({"image_size": (0, 64)}, UserError, "image_size height must be >= 1, got 0"),
    ({"dynamic_batch": True, "max_batch": 0}, UserError, "max_batch must be >= 1, got 0"),
    ({"max_batch": 2.5}, ArgumentTypeError, "max_batch must be an integer, got float 2.5"),
    ({"dynamic_batch": "yes"}, ArgumentTypeError, "dynamic_batch must be True or False, got str 'yes'"),
    ({"verify": 1}, ArgumentTypeError, "verify must be True or False, got int 1"),
    ({"overrides": "data.val_scale=64"}, ArgumentTypeError, "overrides must be a list of 'section.field=value'"),
    ({"deform_op": "grid"}, UserError, "deform_op must be one of 'standard', 'plugin', got 'grid'"),
    ({"fp16": True, "format": "aoti"}, UserError, "fp16 goes with format='onnx'"),
    ({"output": 3}, ArgumentTypeError, "output must be a path"),
    ({"output": "ftp://host/model.onnx"}, UserError, f"output ftp://host/model.onnx: {URL_REFUSED}"),
]


@pytest.mark.parametrize("kwargs, error, message", EXPORTS, ids=[str(e[0]) for e in EXPORTS])
def test_export_arguments_are_checked_before_any_work(checkpoint, tmp_path, monkeypatch, kwargs, error, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(dino_export.export_model, "build_model_from_checkpoint", forbidden)
    kwargs = {"output": tmp_path / "model.onnx", **kwargs}
    with pytest.raises(error, match=message):
        dino_export.export(checkpoint, **kwargs)
    assert list(tmp_path.iterdir()) == []
