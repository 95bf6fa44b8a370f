"""`dino predict`: eval's preprocessing, boxes in original pixels, bad files named and skipped, label names, backends."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import PIL.Image
import pytest
import torch
from torch import nn

from dino.config import DataConfig
from dino.data import build_dataset, collate_fn
from dino.engine.recipe import load_recipe
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint
from dino.models.dino import build_model
from dino.postprocess import PostProcess, postprocess
from dino.predict.artifacts import OnnxRuntimeBackend
from dino.predict.backend import ModelBackend, valid_sizes
from dino.predict.detector import Detector
from dino.predict.draw import MIN_DRAW_SIDE, draw_detections
from dino.predict.files import predict_files
from dino.predict.labels import COCO_CATEGORY_NAMES, ArtifactLabels, LabelNames, label_metadata, read_engine_sidecar
from dino.predict.preprocess import Preprocessor
from dino.weights import save_weights
from dino_cli import main
from dino_export.artifact_labels import set_onnx_labels, write_engine_sidecar

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
CATEGORIES = [{"id": 7, "name": "rectangle"}, {"id": 3, "name": "ellipse"}, {"id": 9, "name": "triangle"}]
# Eval resizes the 64 px shapes images to 96 px, so boxes must be scaled back by 2/3 to the original pixels.
OVERRIDES = ["data.val_scale=96", "data.val_max_size=96"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cfg = load_recipe(TINY, [f"data.root={root / 'shapes'}", *OVERRIDES])
    dataset = build_dataset(cfg.data, "val")  # generates the images
    torch.manual_seed(0)
    checkpoint = root / "model.safetensors"
    save_weights(build_model(cfg.model).state_dict(), checkpoint, {"categories": json.dumps(CATEGORIES)})
    return cfg, dataset, checkpoint, root


def _predict_cli(cfg, checkpoint, inputs, output, *extra):
    return main(["predict", *map(str, inputs), "--recipe", TINY, "--checkpoint", str(checkpoint), "--output",
                 str(output), "--device", "cpu", *extra, "--set", f"data.root={cfg.data.root}", *OVERRIDES])


def test_folder_with_bad_files_matches_eval_and_names_the_bad_ones(tiny_setup, tmp_path, capsys):
    cfg, dataset, checkpoint, _ = tiny_setup
    folder = tmp_path / "in"
    folder.mkdir()
    files = [dataset.coco.imgs[image_id]["file_name"] for image_id in dataset.image_ids]
    images = sorted(dataset.images_dir / name for name in files)
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes(images[0].read_bytes()[:200])
    rc = _predict_cli(cfg, checkpoint, [folder], tmp_path / "out", "--score-threshold", "0", "--max-detections", "5",
                      "--batch-size", "2")
    err = capsys.readouterr().err
    assert rc == 1
    # A folder gives its image files: notes.txt is left out (one line), a broken image is a failure.
    assert "left out 1 file(s) that are not images by their name (notes.txt)" in err
    assert "truncated.png: not a readable image" in err and "notes.txt: not a readable" not in err
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in result["images"]] == [p.name for p in images]
    assert [Path(f["file"]).name for f in result["failed"]] == ["truncated.png"]
    for record in result["images"]:
        assert (tmp_path / "out" / record["picture"]).is_file()
        assert (record["width"], record["height"]) == (64, 64)

    # The reference: dino eval's dataset, collate and PostProcess at the original size.
    model = build_model_from_checkpoint(cfg.model, checkpoint)
    by_name = {Path(r["file"]).name: r for r in result["images"]}
    post = PostProcess(cfg.model.num_select)
    with torch.no_grad():
        for start in range(0, len(dataset), 2):
            indices = range(start, min(start + 2, len(dataset)))
            batch = collate_fn([dataset[i] for i in indices])
            refs = post(model(batch.images, batch.mask), torch.stack([t["orig_size"] for t in batch.targets]))
            for i, ref in zip(indices, refs):
                dets = by_name[Path(files[i]).name]["detections"]
                assert len(dets) == 5
                torch.testing.assert_close(torch.tensor([d["box"] for d in dets]), ref["boxes"][:5], atol=0.01, rtol=0)
                torch.testing.assert_close(torch.tensor([d["score"] for d in dets]), ref["scores"][:5], atol=1e-4,
                                           rtol=0)
                assert [d["label"] for d in dets] == ref["labels"][:5].tolist()
    names = {d["label"]: d["name"] for r in result["images"] for d in r["detections"]}
    expected = {c["id"]: c["name"] for c in CATEGORIES}  # labels are category ids; ids without a name are numbered
    assert names and all(expected.get(label, f"class {label}") == name for label, name in names.items())


def test_single_file_success_exits_zero_and_thresholds(tiny_setup, tmp_path):
    cfg, _, checkpoint, _ = tiny_setup
    image = tmp_path / "wide.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 120, 3), dtype=np.uint8)).save(image)
    assert _predict_cli(cfg, checkpoint, [image], tmp_path / "out", "--score-threshold", "0.99") == 0
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"][0]
    assert (record["width"], record["height"]) == (120, 50)
    assert all(d["score"] >= 0.99 for d in record["detections"])


def test_missing_input_and_bad_options_are_one_line_errors(tiny_setup, tmp_path, capsys):
    cfg, _, checkpoint, _ = tiny_setup
    assert _predict_cli(cfg, checkpoint, [tmp_path / "nope.jpg"], tmp_path / "out") == 2
    assert "input " in capsys.readouterr().err
    image = tmp_path / "a.png"
    PIL.Image.new("RGB", (64, 64)).save(image)
    assert _predict_cli(cfg, checkpoint, [image], tmp_path / "out", "--batch-size", "0") == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert _predict_cli(cfg, checkpoint, [image], tmp_path / "out", "--onnx", "a.onnx", "--aoti", "b.pt2") == 2
    assert "give one of --onnx, --openvino, --aoti, --engine (got --onnx, --aoti)" in capsys.readouterr().err


def test_engine_without_tensorrt_is_a_one_line_error(tiny_setup, tmp_path, capsys, monkeypatch):
    cfg, _, checkpoint, _ = tiny_setup
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 16)
    image = tmp_path / "a.png"
    PIL.Image.new("RGB", (64, 64)).save(image)
    assert _predict_cli(cfg, checkpoint, [image], tmp_path / "out", "--engine", str(engine)) == 2
    err = capsys.readouterr().err
    assert "dino predict: error: --engine needs TensorRT" in err and "Traceback" not in err


class ContractModel(nn.Module):
    """The deploy-graph contract around a detector: (images, mask) -> boxes in valid-region pixels, scores, labels."""

    def __init__(self, detector: nn.Module, num_select: int):
        super().__init__()
        self.detector, self.num_select = detector, num_select

    def forward(self, images, mask):
        out = self.detector(images, mask)
        scores, labels, boxes = postprocess(out["pred_logits"], out["pred_boxes"], valid_sizes(mask), self.num_select)
        return boxes, scores, labels


class ConvDetector(nn.Module):
    """A detector with the DINO I/O contract in a few convolutions (exports to ONNX in seconds)."""

    def __init__(self, num_queries: int = 12, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d((3, 4))
        self.cls = nn.Linear(16, num_classes)
        self.box = nn.Linear(16, 4)

    def forward(self, images, mask):
        q = self.pool(self.stem(images)).flatten(2).transpose(1, 2)  # (B, 12, 16)
        return {"pred_logits": self.cls(q), "pred_boxes": self.box(q).sigmoid()}


def _export_onnx(model: nn.Module, size: tuple[int, int], path: Path) -> None:
    inputs = (torch.randn(1, 3, *size), torch.zeros(1, *size, dtype=torch.bool))
    torch.onnx.export(model, inputs, str(path), input_names=["images", "mask"],
                      output_names=["boxes", "scores", "labels"], dynamo=True, opset_version=18, verbose=False)


def test_onnx_backend_gives_the_pytorch_predictions(tmp_path):
    torch.manual_seed(0)
    detector = ConvDetector().eval()
    graph = tmp_path / "standin.onnx"
    _export_onnx(ContractModel(detector, num_select=8).eval(), (64, 64), graph)
    graph_bytes = graph.read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (48, 64), (64, 40)]):
        PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = DataConfig(val_scale=64, val_max_size=64)
    names = LabelNames.build(4, None)
    files = sorted(folder.iterdir())
    onnx_backend = OnnxRuntimeBackend(graph, "cpu")
    assert onnx_backend.input_size == (64, 64) and onnx_backend.max_batch == 1
    got = predict_files(Detector(onnx_backend, data, names), files, tmp_path / "onnx", batch_size=3, score_threshold=0)
    # PyTorch on the same letterboxed 64x64 inputs, one image per batch as the static-batch graph runs.
    ref = predict_files(Detector(_Letterboxed(ModelBackend(detector, 8), (64, 64)), data, names), files,
                        tmp_path / "torch", batch_size=1, score_threshold=0)
    for a, b in zip(got.images, ref.images):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        torch.testing.assert_close(torch.tensor([d["box"] for d in a["detections"]]),
                                   torch.tensor([d["box"] for d in b["detections"]]), atol=0.02, rtol=0)

    mask_free = tmp_path / "mask_free.onnx"  # a graph of the old, mask-free contract
    images = onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 64, 64])
    boxes = onnx.helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 3, 64, 64])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["images"], ["boxes"])], "g", [images], [boxes])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10), mask_free)
    with pytest.raises(UserError, match="re-export"):
        OnnxRuntimeBackend(mask_free, "cpu")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(graph_bytes[: len(graph_bytes) // 2])
    with pytest.raises(UserError, match="ONNX Runtime cannot load .*corrupt.onnx"):
        OnnxRuntimeBackend(corrupt, "cpu")


class _Letterboxed:
    """A PyTorch backend that reports a fixed input size, so it is fed exactly what the fixed-size graph is fed."""

    def __init__(self, backend, size):
        self.backend, self.input_size, self.max_batch, self.device = backend, size, 1, backend.device

    def run(self, images, mask):
        return self.backend.run(images, mask)


def test_fixed_size_graph_letterboxes_and_fits_images():
    data = DataConfig(val_scale=64, val_max_size=100)
    pre = Preprocessor(data, input_size=(64, 96))
    wide, tall = PIL.Image.new("RGB", (200, 100)), PIL.Image.new("RGB", (100, 200))
    images, mask, resized = pre([wide, tall])
    assert images.shape == (2, 3, 64, 96) and mask.shape == (2, 64, 96)
    # wide: eval size 64x128 does not fit 96 wide -> 48x96; tall: eval size 128x64 -> fits 64 high -> 64x32.
    assert resized == [(48, 96), (64, 32)]
    assert valid_sizes(mask).tolist() == [[48.0, 96.0], [64.0, 32.0]]
    assert not mask[0, :48, :96].any() and mask[0, 48:].all() and mask[1, :, 32:].all()
    # Without a fixed size the batch is padded like dino eval's collate (to the batch maximum).
    images, mask, resized = Preprocessor(data)([wide, tall])
    assert resized == [(50, 100), (100, 50)] and images.shape == (2, 3, 100, 100)


def test_label_names():
    assert len(COCO_CATEGORY_NAMES) == 80 and COCO_CATEGORY_NAMES[1] == "person" and 12 not in COCO_CATEGORY_NAMES
    assert COCO_CATEGORY_NAMES[90] == "toothbrush" and COCO_CATEGORY_NAMES[13] == "stop sign"
    coco = LabelNames.build(91, None)
    assert coco[18].name == "dog" and coco[12].name == "class 12"
    official = LabelNames.build(91, [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}])
    assert official[5] == (5, "cat") and official[2] == (2, "dog") and official[18].name == "class 18"
    assert LabelNames.build(3, None)[2].name == "class 2"


def test_pictures_are_enlarged_and_boxes_have_a_dark_outline():
    image = torch.full((3, 64, 64), 255, dtype=torch.uint8)  # white: a light box colour alone would vanish
    out = draw_detections(image, torch.tensor([[8.0, 8.0, 40.0, 40.0]]), [8], ["thing 0.90"])
    scale = MIN_DRAW_SIDE / 64
    assert out.shape == (3, MIN_DRAW_SIDE, MIN_DRAW_SIDE)
    # The right edge of the box (x = 40 * scale) has dark outline pixels; the image far from it stays white.
    column = out[:, int(8 * scale) + 40: int(40 * scale) - 20, int(40 * scale) - 2: int(40 * scale) + 3]
    assert (column.sum(0) < 100).any()
    assert (out[:, -5:, -5:] == 255).all()


class _FailsOnSecondBatch:
    """Boxes for one 64x64 image, then a real error (as CUDA out of memory would be)."""

    device, input_size, max_batch, name = torch.device("cpu"), None, None, "fake"

    def __init__(self):
        self.calls = 0

    def run(self, images, mask):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return torch.tensor([[[1.0, 2.0, 30.0, 40.0]]]), torch.tensor([[0.9]]), torch.tensor([[0]])


def test_a_failing_batch_keeps_its_traceback_and_what_was_done(tmp_path):
    for i in range(2):
        PIL.Image.new("RGB", (64, 64), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    with pytest.raises(RuntimeError, match="out of memory"):
        predict_files(Detector(_FailsOnSecondBatch(), DataConfig(val_scale=64, val_max_size=64),
                               LabelNames.build(3, None)), files, tmp_path / "out")
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert result["complete"] is False and [Path(r["file"]).name for r in result["images"]] == ["0.png"]
    assert result["images"][0]["detections"] == [{"box": [1.0, 2.0, 30.0, 40.0], "score": 0.9, "label": 0,
                                                  "category_id": 0, "name": "class 0"}]


def test_onnx_graph_names_its_labels_and_refuses_a_recipe_of_another_class_count(tmp_path, capsys):
    torch.manual_seed(0)
    plain = tmp_path / "plain.onnx"
    _export_onnx(ContractModel(ConvDetector(), num_select=8).eval(), (64, 64), plain)
    proto = onnx.load(str(plain))
    set_onnx_labels(proto, label_metadata(4, [{"id": i, "name": f"shape{i}"} for i in range(4)]))
    graph = tmp_path / "labelled.onnx"
    onnx.save(proto, str(graph))
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)

    def predict(onnx_path, recipe, output):
        return main(["predict", str(image), "--recipe", recipe, "--onnx", str(onnx_path), "--output",
                     str(tmp_path / output), "--device", "cpu", "--score-threshold", "0"])

    # A COCO preset (91 classes) with a 4-class graph: refused, where it used to name the shapes with COCO names.
    assert predict(graph, "dino_r50_4scale", "coco") == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"dino predict: error: {graph} was exported for 4 classes but --recipe dino_r50_4scale has "
                           "model.num_classes=91: give the recipe the model was exported from")
    assert not (tmp_path / "coco").exists()
    assert predict(graph, TINY, "tiny") == 0
    assert f"labels: 4 category names recorded in {graph}" in capsys.readouterr().out
    dets = json.loads((tmp_path / "tiny" / "predictions.json").read_text())["images"][0]["detections"]
    assert dets and all(d["name"] == f"shape{d['label']}" for d in dets)
    # A graph exported before labels were recorded: names by the recipe, and the log line says so.
    assert predict(plain, TINY, "plain") == 0
    assert f"(by --recipe engine_tiny: {plain} records no classes" in capsys.readouterr().out


def test_engine_sidecar_round_trip(tmp_path):
    engine = tmp_path / "model.engine"
    assert write_engine_sidecar(engine, {}) is None and read_engine_sidecar(engine) is None
    path = write_engine_sidecar(engine, label_metadata(10, CATEGORIES))  # labels are category ids: 10 slots for id 9
    assert path == tmp_path / "model.engine.json"
    assert read_engine_sidecar(engine) == ArtifactLabels(10, CATEGORIES)
    path.write_text('{"dino.num_classes": "three"}')
    with pytest.raises(UserError, match="model.engine.json: malformed class metadata"):
        read_engine_sidecar(engine)
