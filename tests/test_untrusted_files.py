"""Every file the project reads, made hostile: huge, deeply nested, of the wrong types, out of bounds, climbing out
of its folder, with control characters, truncated. Each case gets one short line naming the file (and the field), or
works (docs/user_errors.md, "Issue 35: hostile files", lists them). Cheap: no training, the session's tiny model."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dino
from dino.config import Recipe
from dino.data.check import check_split
from dino.data.coco import CocoDetection
from dino.engine.checkpoint import read_progress
from dino.engine.checkpointer import Progress
from dino.engine.one_epoch import train_one_epoch
from dino.engine.restore import EMA_STATE, SCHEDULER, _check_counts, _json, _read
from dino.errors import UserError
from dino.predict.draw import draw_detections
from dino.predict.labels import read_engine_sidecar, read_label_metadata
from dino.predict.paths import list_inputs
from dino.predict.recipe import recorded_recipe
from dino.untrusted import printable
from dino_cli import main

DEEP = "[" * 100_000  # a RecursionError in json.loads before the validators
LINE_LIMIT = 400  # no error line quotes more than a short excerpt of what the file holds


def one_line(err, *expected: str) -> str:
    """The error's message, checked: one line, short, holding each of ``expected``."""
    message = str(err.value) if hasattr(err, "value") else str(err)
    assert "\n" not in message and len(message) <= LINE_LIMIT, message[:1000]
    for text in expected:
        assert text in message, message
    return message


# --- progress.json --------------------------------------------------------------------------------------------------

GOOD_PROGRESS = {"epoch": 1, "batches_in_epoch": 2, "global_step": 3, "skipped_steps": 0, "batch_plan": [2, 1],
                 "loss_sums": {"loss": 60.5, "loss_ce": 2.0}, "losses_counted": 2, "recipe": {"optim.lr": 0.001}}
PROGRESS_CASES = {
    "huge": (json.dumps({**GOOD_PROGRESS, "pad": "x" * 2**21}), "bytes, more than"),
    "deeply nested": (DEEP, "nested deeper than 32 levels"),
    "a list": ("[1, 2]", "a list, not an object"),
    "truncated": (json.dumps(GOOD_PROGRESS)[:40], "not JSON"),
    "not UTF-8": (b'{"epoch": "\xff"}', "not UTF-8"),
    "epoch a string": (json.dumps({**GOOD_PROGRESS, "epoch": "1"}), "epoch is '1', not a whole number"),
    "batches_in_epoch 10**18": (json.dumps({**GOOD_PROGRESS, "batches_in_epoch": 10**18}),
                                "batches_in_epoch is 1000000000000000000"),
    "global_step below epoch": (json.dumps({**GOOD_PROGRESS, "epoch": 9}), "global_step 3 is below epoch 9"),
    "skipped above steps": (json.dumps({**GOOD_PROGRESS, "skipped_steps": 4}), "skipped_steps is 4"),
    "batch_plan of strings": (json.dumps({**GOOD_PROGRESS, "batch_plan": ["2", "1"]}), "batch_plan's per-device"),
    "loss sum a list": (json.dumps({**GOOD_PROGRESS, "loss_sums": {"loss": [1]}}), "loss_sums['loss'] is [1]"),
    "loss sum NaN": (json.dumps({**GOOD_PROGRESS, "loss_sums": {"loss": float("nan")}}), "not a finite number"),
    "losses counted beyond": (json.dumps({**GOOD_PROGRESS, "losses_counted": 3}), "losses_counted is 3"),
    "10 MB field": (json.dumps({**GOOD_PROGRESS, "epoch": "e" * 10**7}), "bytes, more than"),
    "recipe a string": (json.dumps({**GOOD_PROGRESS, "recipe": "r" * 1000}), "recipe is 'rrrr"),
}


@pytest.mark.parametrize("case", PROGRESS_CASES)
def test_a_hostile_progress_json_is_one_line(tmp_path, case):
    content, expected = PROGRESS_CASES[case]
    (tmp_path / "progress.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as err:
        read_progress(tmp_path)
    one_line(err, f"cannot resume from {tmp_path}: progress.json is not a valid progress record (", expected)


def test_a_good_progress_json_reads_back(tmp_path):
    (tmp_path / "progress.json").write_text(json.dumps(GOOD_PROGRESS))
    progress = Progress.from_dict(read_progress(tmp_path))
    assert (progress.loss_sums, progress.losses_counted) == ({"loss": 60.5, "loss_ce": 2.0}, 2)


def test_a_position_past_the_runs_epoch_is_refused_before_a_step():
    """batches_in_epoch within 2**53 but beyond this run's epoch: refused by the run's own batch count, before the
    model, the loader or anything else is touched (they are None here)."""
    with pytest.raises(UserError) as err:
        train_one_epoch(None, None, None, None, None, Progress(1, 10**15, 3), None, per_epoch=4, accumulation=2)
    one_line(err, "batches_in_epoch=1000000000000000", "an epoch of this run has 4 micro-batches")


# --- scheduler.json, ema.json ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,what", [(SCHEDULER, "LR scheduler state"), (EMA_STATE, "EMA state")])
@pytest.mark.parametrize("content,expected", [
    ("x" * (2**20 + 1), "bytes, more than"), (DEEP, "nested deeper"), ('{"last_epoch": ', "not JSON"),
])
def test_a_hostile_scheduler_or_ema_json_is_one_line(tmp_path, name, what, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as err:
        _read(tmp_path, name, what, _json)
    one_line(err, f"{name} is not a valid {what} (", expected)


def test_scheduler_and_ema_counts_beyond_progress_are_refused(tmp_path):
    progress = Progress(2, 0, 5)
    with pytest.raises(UserError) as err:
        _check_counts(tmp_path, progress, SimpleNamespace(scheduler={"last_epoch": 10**12}, ema=None))
    one_line(err, "scheduler.json is not a valid LR scheduler state (last_epoch 1000000000000 is not within the 2")
    with pytest.raises(UserError) as err:
        _check_counts(tmp_path, progress, SimpleNamespace(scheduler={"last_epoch": 2}, ema=({}, 6)))
    one_line(err, "ema.json is not a valid EMA state (n_averaged 6 is more than the 5 optimizer steps")


# --- log.jsonl, steps.jsonl (dino plot) -----------------------------------------------------------------------------

STEP = {"step": 1, "epoch": 1, "loss": 3.0, "loss_ce": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0, "lr": 1e-4}
LOG_CASES = {
    "lr a list": ("steps.jsonl", [{**STEP, "lr": [1]}, STEP | {"step": 2}], "line 1: lr is [1], not a number"),
    "step a string": ("steps.jsonl", [{**STEP, "step": "1"}, STEP | {"step": 2}], "line 1: step is '1'"),
    "loss an object": ("steps.jsonl", [{**STEP, "loss": {}}, STEP | {"step": 2}], "line 1: loss is {}"),
    "deeply nested line": ("steps.jsonl", [DEEP, STEP], "line 1: not a JSON record (nested deeper than 32"),
    "huge line": ("steps.jsonl", ["[" + "1," * 2**20 + "1]", STEP], "line 1: longer than 1,048,576 bytes"),
    "eval AP a string": ("log.jsonl", [{"epoch": 1, "global_step": 2, "lr": 1e-4, "eval": {"AP": "high"}}, {}],
                         "line 1: eval.AP is 'high'"),
    "per_category a list": ("log.jsonl", [{"epoch": 1, "global_step": 2, "eval": {"per_category": [1]}}, {}],
                            "line 1: eval.per_category is a list"),
    "10 MB string": ("steps.jsonl", [{**STEP, "lr": "l" * 10**6}, STEP], "line 1: lr is 'lll"),
}


@pytest.mark.parametrize("case", LOG_CASES)
def test_a_hostile_run_log_is_one_line(tmp_path, capsys, case):
    name, records, expected = LOG_CASES[case]
    (tmp_path / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dino plot: error: {tmp_path / name}, ") and err.count("\n") == 1, err[:500]
    one_line(err.rstrip("\n"), expected)
    assert not (tmp_path / "curves.png").exists()


def test_control_characters_mathtext_and_a_cut_off_line_in_a_log_are_drawn(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 1, "global_step": 1, "lr": 1e-4, "train": {"loss": 3.0},
                                                    "eval": {"AP": 0.5, "per_category": {"ca\rt\x1b[2J": 0.5,
                                                                                         "$\\frac{$": 0.25}}})
                                        + "\n" + '{"epoch": 2, "glo')
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0


# --- safetensors metadata: categories and the recorded recipe -------------------------------------------------------

def _with_metadata(tiny_run, tmp_path, *, recipe=None, categories=None) -> Path:
    """A copy of the session's tiny weights whose metadata ``recipe`` (a dict of changes, or a raw string) and
    ``categories`` (a raw string) are replaced."""
    with safe_open(str(tiny_run[0]), "pt") as f:
        metadata = dict(f.metadata())
    if isinstance(recipe, dict):
        metadata["recipe"] = json.dumps({**json.loads(metadata["recipe"]), **recipe})
    elif recipe is not None:
        metadata["recipe"] = recipe
    if categories is not None:
        metadata["categories"] = categories
    path = tmp_path / "model.safetensors"
    save_file(load_file(str(tiny_run[0])), str(path), metadata)
    return path


RECIPE_CASES = {
    "timm kwargs naming a file": ({"model.backbone.timm_kwargs": {"checkpoint_path": "/any/file.pth"}},
                                  "model.backbone.timm_kwargs={'checkpoint_path': '/any/file.pth'}, keyword arguments "
                                  "for timm, which dino never takes from a file"),
    "10 MB string": ({"model.backbone.name": "r" * 10**7}, "longer than 100 characters"),
    "a backbone name with a path": ({"model.backbone.name": "../../evil"}, "not a backbone name"),
    "num_queries 10**9": ({"model.transformer.num_queries": 10**9}, "outside 0..100,000"),
    "a size a string": ({"model.transformer.hidden_dim": "64"}, "hidden_dim is '64' of type str; the field is of type int"),
    "a nested object": ({"model.num_select": {"a": {"b": 1}}}, "not a recipe value"),
    "NaN": ({"model.matcher.cost_class": float("nan")}, "not a finite number"),
    "control characters": ({"name": "tiny\r\x1b[2J"}, "which no recipe field holds"),
    "deeply nested": (DEEP, "nested deeper than 32 levels"),
    "huge": ('{"name": "' + "n" * (16 * 2**20) + '"}', "bytes, more than"),
    "a list": ("[1]", "is a list, not an object"),
    "truncated": ('{"model.num_classes": 4', "not JSON"),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_a_hostile_recorded_recipe_is_one_line(tiny_run, tmp_path, case):
    change, expected = RECIPE_CASES[case]
    path = _with_metadata(tiny_run, tmp_path, recipe=change)
    with pytest.raises(UserError) as err:
        dino.Detector.load(path, device="cpu")
    one_line(err, f"checkpoint {path}: ", expected)


def test_a_recorded_recipe_applies_only_the_model_and_the_validation_resize(tiny_run, tmp_path):
    path = _with_metadata(tiny_run, tmp_path, recipe={"model.backbone.pretrained": "/any/file.pth",
                                                      "data.root": "/etc", "data.val_images": "../../etc",
                                                      "train.output_dir": "/", "data.val_scale": 48})
    cfg = recorded_recipe(path)
    assert cfg.model.backbone.pretrained is None  # dropped: the checkpoint replaces every weight
    default = Recipe()  # no path taken from the file
    assert (cfg.data.root, cfg.data.val_images, cfg.train.output_dir) == (default.data.root, default.data.val_images,
                                                                          default.train.output_dir)
    assert cfg.data.val_scale == 48 and cfg.model.transformer.num_queries == 20
    assert dino.Detector.load(path, device="cpu") is not None


CATEGORY_CASES = {
    "deeply nested": (DEEP, "nested deeper than 32 levels"),
    "an object": ('{"id": 1}', "is {'id': 1}, not a list"),
    "id a string": ('[{"id": "1", "name": "a"}]', "categories'[0].id is '1'"),
    "id 10**12": ('[{"id": 1000000000000, "name": "a"}]', "not a whole number in 0..99,999"),
    "a long name": (json.dumps([{"id": 1, "name": "n" * 10**6}]), "longer than 200 characters"),
    "name a list": ('[{"id": 1, "name": ["a"]}]', "name is ['a'], not a string"),
    "truncated": ('[{"id": 1, "na', "not JSON"),
}


@pytest.mark.parametrize("case", CATEGORY_CASES)
def test_hostile_categories_in_weights_are_one_line(tiny_run, tmp_path, case):
    text, expected = CATEGORY_CASES[case]
    path = _with_metadata(tiny_run, tmp_path, categories=text)
    with pytest.raises(UserError) as err:
        dino.Detector.load(path, device="cpu")
    one_line(err, f"checkpoint {path}: metadata 'categories' is not a JSON list of {{id, name}} (", expected)


def test_a_class_name_with_control_characters_is_kept_in_json_and_escaped_in_the_picture(tiny_run, tmp_path):
    names = [{"id": i, "name": f"shape\r{i}\x1b[2J\u202e"} for i in (1, 2, 3)]
    path = _with_metadata(tiny_run, tmp_path, categories=json.dumps(names))
    detector = dino.Detector.load(path, device="cpu")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    found = detector(image, score_threshold=0.0)
    assert found.to_dict()["detections"], "the random tiny model scores something"
    raw = {n["id"]: n["name"] for n in names}
    named = [d for d in found.to_dict()["detections"] if d["category_id"] in raw]
    assert named and all(d["name"] == raw[d["category_id"]] for d in named)  # kept as they are
    assert found.draw(image).size[0] >= 480  # raqm_layout() failed on "\r" before
    picture = draw_detections(torch.zeros(3, 64, 64, dtype=torch.uint8), torch.tensor([[1.0, 1, 30, 30]]), [1],
                              ["a\rb 0.50"])
    assert picture.shape == (3, 480, 480)
    assert printable("a\rb\x1b[31m\u202e") == "a\\rb\\x1b[31m\\u202e"


# --- exported artifacts: ONNX / OpenVINO / AOTInductor metadata, TensorRT sidecar ------------------------------------

LABEL_CASES = {
    "count 10**9": ({"dino.num_classes": str(10**9)}, "not a whole number in 1..100,000"),
    "count 1e3": ({"dino.num_classes": "1e3"}, "dino.num_classes is '1e3', not a whole number"),
    "count huge string": ({"dino.num_classes": "9" * 10**6}, "longer than 16 characters"),
    "categories deeply nested": ({"dino.num_classes": "4", "dino.categories": DEEP}, "nested deeper than 32"),
    "category beyond the classes": ({"dino.num_classes": "4", "dino.categories": '[{"id": 7, "name": "a"}]'},
                                    "category id 7 is not a label of a 4-class model"),
    "category name huge": ({"dino.num_classes": "4", "dino.categories": json.dumps([{"id": 1, "name": "x" * 10**7}])},
                           "longer than 200 characters"),
    "categories truncated": ({"dino.num_classes": "4", "dino.categories": '[{"id"'}, "not JSON"),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_hostile_artifact_class_metadata_is_one_line(case):
    meta, expected = LABEL_CASES[case]
    with pytest.raises(UserError) as err:
        read_label_metadata(meta, "graph.onnx")
    one_line(err, "graph.onnx: malformed class metadata (", expected, "re-export it")


@pytest.mark.parametrize("content,expected", [
    ("x" * (16 * 2**20 + 1), "bytes, more than"), (DEEP, "nested deeper than 32"), ("[1]", "not an object"),
    ('{"dino.num_classes": ["4"]}', "dino.num_classes is ['4'], not a string"), ('{"dino.num', "not JSON"),
])
def test_a_hostile_engine_sidecar_is_one_line(tmp_path, content, expected):
    (tmp_path / "model.engine.json").write_text(content)
    with pytest.raises(UserError) as err:
        read_engine_sidecar(tmp_path / "model.engine")
    one_line(err, "model.engine.json", expected)


def test_a_good_onnx_graphs_labels_read_back(tiny_onnx):
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tiny_onnx), load_external_data=False).metadata_props}
    labels = read_label_metadata(meta, str(tiny_onnx))
    assert labels.num_classes == 4 and [c["name"] for c in labels.categories] == ["rectangle", "ellipse", "triangle"]


# --- COCO annotations -----------------------------------------------------------------------------------------------

def _coco(tmp_path, images, categories=({"id": 1, "name": "cat"},), annotations=()) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": list(images), "annotations": list(annotations),
                                "categories": list(categories)}))
    return path


@pytest.mark.parametrize("file_name,problem", [("../../etc/hostname", "climbs out of the images folder (..)"),
                                               ("/etc/hostname", "is an absolute path"),
                                               ("C:\\Windows\\win.ini", "is an absolute path"),
                                               ("a\0.png", "holds a NUL character")])
def test_a_file_name_outside_the_images_folder_is_never_opened(tmp_path, file_name, problem):
    path = _coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                            {"id": 2, "file_name": file_name, "width": 32, "height": 32}])
    with pytest.raises(UserError) as err:
        CocoDetection(tmp_path / "img", path)
    one_line(err, f"1 image file_name(s) of {path} do not name a file inside the images folder", problem)
    report = check_split("train", tmp_path / "img", path, progress=False)
    flagged = [p for p in report.problems if p.kind == "file_name outside the images folder"]
    assert len(flagged) == 1 and problem in flagged[0].detail and flagged[0] in report.fatal()
    assert not [p for p in report.problems if p.kind in ("missing image file", "unreadable image")]


def test_data_check_flags_crowds_areas_and_control_characters(tmp_path):
    path = _coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
                 categories=[{"id": 1, "name": "ca\rt"}],
                 annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 2},
                              {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": -3}])
    report = check_split("train", tmp_path / "img", path, progress=False)
    details = {p.kind: p.detail for p in report.problems}
    assert details["iscrowd not 0 or 1"].startswith("annotation id 1 has iscrowd 2")
    assert details["negative area"].startswith("annotation id 2 has area -3")
    assert details["control character in category name"].startswith("category id 1 is named 'ca\\rt'")
    assert not report.fatal()


@pytest.mark.parametrize("categories,expected", [
    ([{"id": 10**9, "name": "a"}], "would need 1,000,000,001 class outputs"),
    ([{"id": 1, "name": "n" * 10**6}], "has a name of 1,000,000 characters"),
])
def test_categories_a_model_could_not_record_are_refused(tmp_path, categories, expected):
    path = _coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], categories=categories)
    with pytest.raises(UserError) as err:
        CocoDetection(tmp_path / "img", path)
    one_line(err, f"annotations file {path}: categories[0]", expected)


def test_a_deeply_nested_annotations_file_is_one_line(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": ' + DEEP)
    with pytest.raises(UserError) as err:
        CocoDetection(tmp_path, path)
    one_line(err, f"annotations file {path} is not a COCO annotations file: its JSON nests too deeply")


# --- dino predict's inputs: symlinks and other entries ---------------------------------------------------------------

def test_predict_names_every_entry_of_a_folder_it_leaves_out(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "good.png")
    os.symlink("missing.png", tmp_path / "dangling.png")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden.png").write_bytes(b"")
    files, _ = list_inputs([tmp_path])
    assert files == [tmp_path / "good.png"]
    assert capsys.readouterr().err.splitlines() == [
        f"dino predict: {tmp_path}: left out 'dangling.png': it is a symlink to missing.png, which does not exist",
        f"dino predict: {tmp_path}: left out 'loop.png': it is a symlink loop",
        f"dino predict: {tmp_path}: left out 'pipe.png': it is not a file or a folder (a FIFO, socket or device)",
        f"dino predict: {tmp_path}: left out 1 subfolder(s), not entered (name them to predict on their images): "
        "'sub'",
        f"dino predict: {tmp_path}: left out 1 hidden entr(ies): '.hidden.png'",
    ]
    with pytest.raises(UserError) as err:
        list_inputs([tmp_path / "loop.png"])
    one_line(err, f"input {tmp_path / 'loop.png'} is a symlink loop")
    with pytest.raises(UserError) as err:
        list_inputs([tmp_path / "dangling.png"])
    one_line(err, "is a symlink to missing.png, which does not exist")


def test_a_checkpoint_folder_with_hostile_files_resumes_nothing(tiny_run, tmp_path):
    """dino train --resume on a checkpoint whose progress.json is 100,000 nested lists: one line, exit 2, nothing
    written to the output folder."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text(DEEP)
    shutil.copy(tiny_run[0], checkpoint / "model.safetensors")
    out = tmp_path / "out"
    rc = main(["train", str(Path(__file__).parent / "engine_tiny_recipe.py"), "--resume", str(checkpoint),
               "--set", *tiny_run[1], f"train.output_dir={out}"])
    assert rc == 2
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("content", [DEEP, '{"images": [{"picture": ["a"]}]}', '{"images": ', "[1]"])
def test_a_hostile_predictions_json_in_an_input_folder_is_an_ordinary_file(tmp_path, capsys, content):
    Image.new("RGB", (32, 32)).save(tmp_path / "good.png")
    (tmp_path / "predictions.json").write_text(content)
    assert list_inputs([tmp_path])[0] == [tmp_path / "good.png"]
    assert "left out 1 file(s) that are not images by their name (predictions.json)" in capsys.readouterr().err


def test_hostile_category_names_are_drawn_in_the_pr_curves(tmp_path):
    """A name from an annotations file is drawn as text: "$\\frac{$" would be parsed as TeX by matplotlib (a
    ValueError), a "\\r" would break the legend."""
    from dino.plots.pr_curves import plot_pr_curves

    recall = [0.0, 0.5, 1.0]
    pr = {"recall": recall, "ious": [0.5, 0.75], "all": [[1.0, 0.5, 0.0]] * 2,
          "categories": {"$\\frac{$": [[1.0, 0.5, 0.0]] * 2, "ca\rt\x1b[2J": [[1.0, None, 0.0]] * 2},
          "ground_truth": {"$\\frac{$": 3}}
    plot_pr_curves(pr, tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 0
