"""A broken dataset through the `dino` commands: one line naming the file and the entry, exit 2, no traceback;
`dino eval` refuses a set without ground truth and prints the AP of each category."""
import json
from pathlib import Path

import pytest

import dino_cli
from dino.models.dino import build_model
from dino.weights import save_weights
from tests.test_data_coco import ann, make_dataset
from tests.test_data_unreadable import TINY


def _eval(capsys, root, checkpoint, *overrides, output_dir=None):
    rc = dino_cli.main(["eval", "--recipe", TINY, "--checkpoint", str(checkpoint), "--output-dir",
                        str(output_dir or Path(root) / "eval"), "--set", "data.dataset=coco", f"data.root={root}",
                        "data.val_images=img", "data.val_annotations=instances.json", *overrides])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


BROKEN = {
    "missing json": (lambda root, path: path.unlink(), "annotations file {path} does not exist"),
    "invalid json": (lambda root, path: path.write_text('{"images": ['),
                     "annotations file {path} is not valid JSON: Expecting value: line 1 column 13 (char 12)"),
    "unknown image id": (
        lambda root, path: _edit(path, annotations=[ann(8, [0, 0, 5, 5], image_id=3)]),
        "annotations file {path}: annotation id 8 references image_id 3, which is not in 'images'"),
    "unknown category id": (
        lambda root, path: _edit(path, annotations=[ann(7, [0, 0, 5, 5], category_id=4)]),
        "annotations file {path}: annotation id 7 has category_id 4, which is not in 'categories' (ids [2, 5, 9])"),
    "image missing on disk": (
        lambda root, path: (root / "img" / "a.png").unlink(),
        "1 of 1 images listed in {path} are missing from {root}/img: a.png"),
}


def _edit(path, **fields):
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_dataset_is_one_line_exit_2(tmp_path, capsys, case):
    _, path = make_dataset(tmp_path, annotations=[ann(1, [0, 0, 10, 10])])
    checkpoint = tmp_path / "w.safetensors"
    checkpoint.write_bytes(b"")  # never read: the dataset fails first
    breaks, message = BROKEN[case]
    breaks(tmp_path, path)
    rc, out, err = _eval(capsys, tmp_path, checkpoint)
    assert rc == 2 and "Traceback" not in err
    assert err == "dino eval: error: " + message.format(path=path, root=tmp_path) + "\n"


def test_eval_refuses_a_set_without_ground_truth(tmp_path, capsys):
    _, path = make_dataset(tmp_path, annotations=[ann(1, [70, 10, 5, 5])])  # dropped: entirely outside the image
    checkpoint = tmp_path / "w.safetensors"
    checkpoint.write_bytes(b"")
    rc, out, err = _eval(capsys, tmp_path, checkpoint)
    assert rc == 2 and out == ""
    assert err == (f"dino eval: error: {path} has no ground-truth boxes to evaluate against (no annotations, or only "
                   "crowd or dropped ones); use `dino predict` for predictions without ground truth\n")


def test_eval_prints_and_stores_per_category_ap(tmp_path, capsys):
    from dino.engine.recipe import load_recipe

    root = tmp_path / "shapes"
    cfg = load_recipe(TINY, [f"data.root={root}"])
    save_weights(build_model(cfg.model).state_dict(), tmp_path / "model.safetensors")
    rc = dino_cli.main(["eval", "--recipe", TINY, "--checkpoint", str(tmp_path / "model.safetensors"),
                        "--set", f"data.root={root}", "--output-dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    start = out.index(" Per-category Average Precision (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]:")
    assert [line.split(" = ")[0].strip() for line in out[start + 1:start + 4]] == ["rectangle", "ellipse", "triangle"]
    assert out[start - 12].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    per_category = results["per_category"]
    assert list(per_category) == ["rectangle", "ellipse", "triangle"]
    # the table's AP is the mean of the categories' APs (all three have ground truth in the 5 shapes images)
    assert results["AP"] == pytest.approx(sum(per_category.values()) / 3, abs=1e-12)
    for name, ap in per_category.items():
        assert f"  {name:<9} = {ap:0.3f}" in out
