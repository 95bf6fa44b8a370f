"""`dino data check`: every problem of a dataset found in one scan, counted by kind, listed with its file; exit 1
when one would stop training."""
import json

from PIL import Image

import dino_cli
from dino.data.check import check_split, format_report
from tests.test_data_coco import ann, make_dataset
from tests.test_data_unreadable import TINY, truncate


def _broken_dataset(tmp_path):
    """One problem of each kind; returns (images_dir, annotations json)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(1, 7)]
    images.append({"id": 7, "file_name": "1.png", "width": 64, "height": 48})  # the same file listed twice
    anns = [
        ann(1, [10, 10, -5, 10]),  # negative width
        ann(2, [70, 10, 5, 5], image_id=2),  # entirely outside
        ann(3, [50, 40, 30, 30], image_id=3),  # partly outside: clipped
        ann(4, [0, 0, 10, 10], category_id=4, image_id=3),  # no such category
        ann(5, [0, 0, 10, 10], image_id=99),  # no such image
        ann(6, [0, 0, 10, 10], image_id=4),
        ann(7, [0, 0, 10, 10], image_id=5),
        ann(8, [0, 0, 10, 10], image_id=6),
    ]  # image 7 has none
    images_dir, path = make_dataset(tmp_path, images=images, annotations=anns)
    truncate(images_dir / "4.png")
    (images_dir / "5.png").unlink()
    Image.new("RGB", (32, 32)).save(images_dir / "6.png")
    return images_dir, path


def test_check_split_finds_every_problem_once(tmp_path):
    images_dir, path = _broken_dataset(tmp_path)
    report = check_split("train", images_dir, path, progress=False)
    assert (report.images, report.annotations, report.categories) == (7, 8, 3)
    assert dict(report.counts()) == {
        "negative width": 1, "entirely outside the image": 1, "box partly outside (clipped)": 1,
        "unknown category_id": 1, "unknown image_id": 1, "unreadable image": 1, "missing image file": 1,
        "size differs from json": 1, "duplicate image file": 1, "image without annotations": 1,
    }
    assert sorted(p.kind for p in report.fatal()) == [
        "missing image file", "size differs from json", "unknown category_id", "unknown image_id", "unreadable image"]
    by_kind = {p.kind: p for p in report.problems}
    assert by_kind["unreadable image"].file == str(images_dir / "4.png")
    assert by_kind["negative width"].file == str(path)
    assert by_kind["negative width"].detail == "annotation id 1 has bbox [10, 10, -5, 10] in 1.png (64x48)"
    assert by_kind["size differs from json"].detail == "image id 6 is 32x32, the json says 64x48"
    assert by_kind["duplicate image file"].detail == "image ids 1 and 7 both list this file"
    # --fast opens without decoding: the truncated file passes; with skip_unreadable it does not stop training
    fast = check_split("train", images_dir, path, fast=True, progress=False)
    assert "unreadable image" not in fast.counts() and fast.counts()["missing image file"] == 1
    skipping = check_split("train", images_dir, path, skip_unreadable=True, progress=False)
    assert "unreadable image" not in {p.kind for p in skipping.fatal()}


def test_check_split_reports_a_broken_annotations_file(tmp_path):
    report = check_split("val", tmp_path, tmp_path / "nope.json", progress=False)
    assert [(p.kind, p.detail) for p in report.problems] == [("annotations file", "does not exist")]
    (tmp_path / "bad.json").write_text("{")
    report = check_split("val", tmp_path, tmp_path / "bad.json", progress=False)
    assert report.problems[0].detail.startswith("is not valid JSON")


def test_report_table_and_capped_listing(tmp_path):
    images_dir, path = _broken_dataset(tmp_path)
    report = check_split("train", images_dir, path, progress=False)
    text = format_report([report], limit=3).splitlines()
    assert text[0].split() == ["train"]
    assert [line.split() for line in text[1:4]] == [["images", "7"], ["annotations", "8"], ["categories", "3"]]
    assert "unreadable image *" in "\n".join(text) and "(* stops training)" in text
    listing = text[text.index("problems (3 of 10):") + 1:]
    assert len(listing) == 4 and listing[-1] == "  ... and 7 more (--max-listed N lists more)"
    assert all(" *: " in line for line in listing[:3])  # what stops training is listed first


def _check(capsys, *args):
    rc = dino_cli.main(["data", "check", "--recipe", TINY, *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_exit_status(tmp_path, capsys):
    root = tmp_path / "shapes"
    rc, out, err = _check(capsys, "--set", f"data.root={root}")  # generates the shapes dataset, as training would
    assert rc == 0 and out.splitlines()[-1] == "no problem would stop training" and err == ""
    assert out.splitlines()[1].split() == ["images", "8", "5"]
    truncate(root / "train" / "000003.png")
    data = json.loads((root / "annotations" / "val.json").read_text())
    data["annotations"][0]["bbox"][3] = -2
    (root / "annotations" / "val.json").write_text(json.dumps(data))
    rc, out, _ = _check(capsys, "--set", f"data.root={root}")
    assert rc == 1
    assert f"  train: unreadable image *: {root / 'train' / '000003.png'}: image id 4: image file is truncated" in out
    assert [line.split() for line in out.splitlines() if line.startswith("negative height")] == [
        ["negative", "height", "0", "1"]]
    assert out.splitlines()[-1] == ("1 problem(s) would stop training: fix them before training (or skip unreadable "
                                    "images: --set data.skip_unreadable=true)")
    rc, out, _ = _check(capsys, "--set", f"data.root={root}", "data.skip_unreadable=true", "--split", "val")
    assert rc == 0 and out.splitlines()[0].split() == ["val"]
    rc, out, err = _check(capsys, "--set", "data.nope=1")
    assert rc == 2 and out == "" and err == "dino data check: error: override 'data.nope=1': no field 'nope' in DataConfig\n"


def test_cli_missing_annotations_file_is_a_problem_not_a_traceback(tmp_path, capsys):
    rc, out, err = _check(capsys, "--set", "data.dataset=coco", f"data.root={tmp_path}", "--split", "train")
    assert rc == 1 and err == ""
    assert f"  train: annotations file *: {tmp_path / 'annotations' / 'train.json'}: does not exist" in out
