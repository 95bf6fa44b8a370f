"""The synthetic shapes dataset: deterministic, valid COCO, idempotent, atomic replacement."""
import contextlib
import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dino.data.shapes import generate_shapes_dataset
from dino.errors import UserError

SIZE = 64


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", 12, 4, SIZE, seed=3)


def test_generation_is_deterministic(shapes_root, tmp_path):
    again = generate_shapes_dataset(tmp_path / "again", 12, 4, SIZE, seed=3)
    first, second = _files(shapes_root), _files(again)
    assert sorted(first) == sorted(second)
    assert len([n for n in first if n.endswith(".png")]) == 16
    assert first == second


def test_other_seed_gives_other_images(shapes_root, tmp_path):
    other = generate_shapes_dataset(tmp_path / "other", 12, 4, SIZE, seed=4)
    assert (other / "train" / "000000.png").read_bytes() != (shapes_root / "train" / "000000.png").read_bytes()


@pytest.mark.parametrize("split,count", [("train", 12), ("val", 4)])
def test_annotations_are_valid_coco(shapes_root, split, count):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(shapes_root / "annotations" / f"{split}.json"))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {1: "rectangle", 2: "ellipse", 3: "triangle"}
    assert len(coco.getImgIds()) == count
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        with Image.open(shapes_root / split / info["file_name"]) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(anns) <= 4
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            # objects are "reasonably large": 15-50% of the image side
            assert 0.15 * SIZE - 1 <= w <= 0.5 * SIZE + 1 and 0.15 * SIZE - 1 <= h <= 0.5 * SIZE + 1
            assert ann["iscrowd"] == 0 and ann["area"] == w * h


def test_objects_are_visible_in_their_boxes(shapes_root):
    """Object pixels are saturated, the background is not: the box centre differs clearly from the background."""
    data = json.loads((shapes_root / "annotations" / "train.json").read_text())
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    for img in data["images"]:
        pixels = np.asarray(Image.open(shapes_root / "train" / img["file_name"]), dtype=np.float32)
        saturation = pixels.max(-1) - pixels.min(-1)
        covered = np.zeros((SIZE, SIZE), dtype=bool)
        for x, y, w, h in by_image[img["id"]]:
            covered[y : y + h, x : x + w] = True
        assert np.median(saturation[~covered]) < 60
        for x, y, w, h in by_image[img["id"]]:
            cx, cy = x + w // 2, y + h // 2
            assert saturation[cy, cx] > 80, (img["file_name"], (x, y, w, h))


def test_generation_is_idempotent_and_regenerates_on_new_parameters(tmp_path):
    root = generate_shapes_dataset(tmp_path / "ds", 3, 2, SIZE)
    stamp_mtime = (root / ".shapes_stamp.json").stat().st_mtime_ns
    marker = root / "train" / "marker.txt"
    marker.write_text("kept when nothing changes")
    assert generate_shapes_dataset(tmp_path / "ds", 3, 2, SIZE) == root
    assert marker.exists() and (root / ".shapes_stamp.json").stat().st_mtime_ns == stamp_mtime
    marker.unlink()
    generate_shapes_dataset(tmp_path / "ds", 5, 2, SIZE)
    assert len(list((root / "train").glob("*.png"))) == 5
    assert len(json.loads((root / "annotations" / "train.json").read_text())["images"]) == 5
    # no temporary folders left behind (the lock files stay, the one-writer lock's record goes)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.dino-run.lock", ".ds.lock", "ds"]


def test_stamp_lists_every_file_made(tmp_path):
    root = generate_shapes_dataset(tmp_path / "ds", 3, 2, SIZE)
    stamp = json.loads((root / ".shapes_stamp.json").read_text())
    assert stamp["files"] == sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                                    if p.is_file() and p.name != ".shapes_stamp.json")
    assert len(stamp["files"]) == 3 + 2 + 2


@pytest.mark.parametrize("user_path", ["notes.txt", "train/marker.txt", "annotations/mine.json", "extra/a.png"])
def test_new_settings_refuse_a_folder_holding_user_files_and_delete_nothing(tmp_path, user_path):
    root = generate_shapes_dataset(tmp_path / "ds", 3, 2, SIZE)
    (root / user_path).parent.mkdir(exist_ok=True)
    (root / user_path).write_text("the user's")
    before = _files(root)
    shown = user_path.split("/")[0] + "/" if user_path.startswith("extra/") else user_path
    with pytest.raises(UserError) as err:
        generate_shapes_dataset(tmp_path / "ds", 5, 2, SIZE)
    assert str(err.value) == (
        f"data.root {root} holds 1 file(s) the shapes generator did not make ({shown}); new data.shapes_* settings "
        "would regenerate the folder, so it is left as it is: move them out, or choose another data.root for the new "
        "settings")
    assert _files(root) == before and (root / user_path).read_text() == "the user's"


def test_a_stamp_without_the_file_list_still_tells_its_files_apart(tmp_path):
    # Stamps written before the list was recorded: the generator's file names follow from the parameters.
    root = generate_shapes_dataset(tmp_path / "ds", 3, 2, SIZE)
    stamp = json.loads((root / ".shapes_stamp.json").read_text())
    del stamp["files"]
    (root / ".shapes_stamp.json").write_text(json.dumps(stamp))
    assert generate_shapes_dataset(tmp_path / "ds", 3, 2, SIZE) == root  # same settings: no-op
    (root / "val" / "mine.png").write_bytes(b"x")
    with pytest.raises(UserError, match=r"holds 1 file\(s\) the shapes generator did not make \(val/mine.png\)"):
        generate_shapes_dataset(tmp_path / "ds", 4, 2, SIZE)
    (root / "val" / "mine.png").unlink()
    generate_shapes_dataset(tmp_path / "ds", 4, 2, SIZE)
    assert len(list((root / "train").glob("*.png"))) == 4


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="is not empty and is not a shapes dataset"):
        generate_shapes_dataset(tmp_path / "mine", 2, 1, SIZE)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("kwargs,field", [({"num_train": 0}, "num_train"), ({"image_size": 8}, "image_size")])
def test_bad_parameters_are_named(tmp_path, kwargs, field):
    args = {"num_train": 2, "num_val": 1, "image_size": SIZE, **kwargs}
    with pytest.raises(ValueError, match=field):
        generate_shapes_dataset(tmp_path / "ds", **args)
    with pytest.raises(UserError, match=f"data.shapes_\\w+ \\({field}\\) must be an integer >= "):
        generate_shapes_dataset(tmp_path / "ds", **args)


def _generate_in_child(root, rank):
    os.environ["RANK"] = str(rank)  # as torchrun sets it: only rank 0 takes data.root's one-writer lock
    generate_shapes_dataset(root, 6, 2, SIZE, seed=1)


def test_concurrent_generation_yields_one_complete_dataset(tmp_path):
    """The processes of one launch all call build_dataset at once: each must end up with the same full dataset."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_generate_in_child, args=(tmp_path / "ds", rank)) for rank in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    reference = generate_shapes_dataset(tmp_path / "ref", 6, 2, SIZE, seed=1)
    assert _files(tmp_path / "ds") == _files(reference)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_dino_train_with_new_shapes_settings_over_user_files_is_one_line(tmp_path, capsys):
    import dino_cli

    root = generate_shapes_dataset(tmp_path / "ds", 8, 5, SIZE)
    (root / "labels.csv").write_text("the user's")
    capsys.readouterr()  # the line saying where it was generated
    tiny = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
    rc = dino_cli.main(["train", tiny, "--set", f"data.root={root}", f"train.output_dir={tmp_path / 'out'}",
                        "data.shapes_train_images=9"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"dino train: error: data.root {root} holds 1 file(s) the shapes generator did "
                                      "not make (labels.csv); ") and len(err.splitlines()) == 1
    assert (root / "labels.csv").read_text() == "the user's" and len(list((root / "train").glob("*.png"))) == 8


def _digest(root: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, data in _files(root).items():
        digest.update(name.encode())
        digest.update(data)
    return digest.hexdigest()


def test_square_datasets_are_unchanged_by_the_non_square_setting(tmp_path):
    """Every file (images, annotations, stamp) of a square dataset is byte-identical to what the generator wrote
    before data.shapes_val_image_size existed (digest taken with that code, 2026-12-08), so the quickstart's data and
    AP are unchanged and existing folders are not regenerated."""
    root = generate_shapes_dataset(tmp_path / "ds", 3, 2, 64, seed=0)
    assert _digest(root) == "23e227ceaa1747c94011dc9382e4a2f524e85ab1a812d203556f4c95742646d8"


def test_non_square_validation_images(tmp_path, caplog):
    square = generate_shapes_dataset(tmp_path / "square", 3, 4, 64, seed=0)
    root = generate_shapes_dataset(tmp_path / "wide", 3, 4, 64, seed=0, val_image_size=(40, 64))
    assert f"4 val images of 40x64 px, seed 0) into {root}" in caplog.text
    for name in ("train/000000.png", "train/000002.png", "annotations/train.json"):  # training images stay square
        assert (root / name).read_bytes() == (square / name).read_bytes()
    data = json.loads((root / "annotations" / "val.json").read_text())
    assert {(img["height"], img["width"]) for img in data["images"]} == {(40, 64)}
    for img in data["images"]:
        with Image.open(root / "val" / img["file_name"]) as im:
            assert im.size == (64, 40)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 40
        assert 0.15 * 64 - 1 <= w <= 0.5 * 64 + 1 and 0.15 * 40 - 1 <= h <= 0.5 * 40 + 1  # 15-50% of each side
    # Another validation size regenerates the folder; the stamp records it.
    tall = generate_shapes_dataset(root, 3, 4, 64, seed=0, val_image_size=(64, 40))
    assert json.loads((tall / ".shapes_stamp.json").read_text())["val_image_size"] == [64, 40]
    with Image.open(tall / "val" / "000000.png") as im:
        assert im.size == (40, 64)


@pytest.mark.parametrize("value", [(40,), (16, 64), (40.0, 64), 64])
def test_bad_validation_size_is_named(tmp_path, value):
    with pytest.raises(UserError, match=r"^data.shapes_val_image_size must be \(height, width\), integers >= 32"):
        generate_shapes_dataset(tmp_path / "ds", 3, 2, 64, val_image_size=value)
    assert not (tmp_path / "ds").exists()
