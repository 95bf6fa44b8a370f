"""curves.png and pr_curves.png from hand-written logs and a hand-made COCO case: the series drawn equal the logged
values and pycocotools' precision array, the PNGs decode at their size, cut-off and evaluation-less logs still plot."""
import contextlib
import io
import json
import logging
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dino.data import evaluate_coco
from dino.errors import UserError
from dino.plots.curves import plot_run
from dino.plots.pr_curves import plot_pr_curves
from dino_cli import main

TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou")


def _epoch(epoch, step, loss, lr, ap=None, per_category=None):
    record = {"epoch": epoch, "global_step": step, "lr": lr, "images_per_s": 10.0, "epoch_time_s": 5.0,
              "train": {"loss": loss, "loss_ce": loss / 10, "loss_bbox": loss / 5, "loss_giou": loss / 4,
                        "loss_ce_0": 1.0}}
    if ap is not None:
        record["eval"] = {"AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.05, "APs": -1.0, "num_images": 5,
                          "per_category": per_category or {}}
    return record


def _step(step, epoch, loss, lr):
    return {"step": step, "epoch": epoch, "loss": loss, "loss_ce": loss / 10, "loss_bbox": loss / 5,
            "loss_giou": loss / 4, "lr": lr}


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _png_size(path):
    with Image.open(path) as image:
        image.load()  # decodes the whole picture, not only the header
        return image.size


def test_curves_equal_the_logs_and_a_cut_off_last_line_is_skipped(tmp_path, caplog):
    epochs = [_epoch(1, 3, 30.0, 1e-4), _epoch(2, 6, 25.0, 1e-4, ap=0.2, per_category={"cat": 0.1, "dog": 0.3}),
              _epoch(3, 9, 22.0, 1e-5, ap=0.35, per_category={"cat": 0.25, "dog": 0.5, "owl": None, "ant": 0.4})]
    steps = [_step(s, (s - 1) // 3 + 1, 40.0 - s, 1e-4 if s <= 6 else 1e-5) for s in range(1, 10)]
    _write(tmp_path / "log.jsonl", epochs)
    _write(tmp_path / "steps.jsonl", steps, tail='{"step": 10, "epoch": 4, "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="dino"):
        drawn = plot_run(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'steps.jsonl'}: its last line (10) is cut off or not a JSON record; skipped"]
    assert drawn.step_source == "steps.jsonl"
    assert drawn.steps == list(range(1, 10))
    assert drawn.losses == {k: [r[k] for r in steps] for k in TERMS}
    assert drawn.lr == [r["lr"] for r in steps]
    assert (drawn.epochs, drawn.epoch_ends, drawn.epoch_losses) == ([1, 2, 3], [3, 6, 9], [30.0, 25.0, 22.0])
    assert drawn.eval_epochs == [2, 3]
    assert drawn.ap == {k: [r["eval"][k] for r in epochs[1:]] for k in ("AP", "AP50", "AP75")}
    # The last evaluation's categories with ground truth, highest first (owl has none: no bar).
    assert list(drawn.per_category.items()) == [("dog", 0.5), ("ant", 0.4), ("cat", 0.25)]
    assert drawn.per_category_epoch == 3
    assert _png_size(tmp_path / "curves.png") == (1500, 800)


def test_a_run_without_evaluation_or_step_log_plots_its_epoch_means(tmp_path):
    epochs = [_epoch(1, 2, 30.0, 1e-4), _epoch(2, 4, 26.0, 1e-4)]
    _write(tmp_path / "log.jsonl", epochs)
    drawn = plot_run(tmp_path, tmp_path / "elsewhere.png")
    assert drawn.step_source == "log.jsonl"
    assert drawn.steps == [2, 4] and drawn.losses["loss"] == [30.0, 26.0]
    assert drawn.losses["loss_giou"] == [7.5, 6.5] and drawn.lr == [1e-4, 1e-4]
    assert drawn.eval_epochs == [] and drawn.ap == {"AP": [], "AP50": [], "AP75": []} and drawn.per_category == {}
    assert _png_size(tmp_path / "elsewhere.png") == (1500, 800)
    assert not (tmp_path / "curves.png").exists()


def test_a_resumed_run_is_drawn_along_its_last_timeline(tmp_path):
    # Resumed from the checkpoint of step 4 after steps 5-6 and epoch 2 had been logged: those were trained again.
    _write(tmp_path / "log.jsonl", [_epoch(1, 2, 30.0, 1e-4), _epoch(2, 4, 26.0, 1e-4), _epoch(2, 4, 25.5, 1e-4),
                                    _epoch(3, 6, 24.0, 1e-4)])
    _write(tmp_path / "steps.jsonl", [_step(s, 1, 10.0 + s, 1e-4) for s in (1, 2, 3, 4, 5, 6)]
           + [_step(s, 1, 20.0 + s, 1e-4) for s in (5, 6)])
    drawn = plot_run(tmp_path)
    assert drawn.steps == [1, 2, 3, 4, 5, 6] and drawn.losses["loss"] == [11.0, 12.0, 13.0, 14.0, 25.0, 26.0]
    assert drawn.epochs == [1, 2, 3] and drawn.epoch_losses == [30.0, 25.5, 24.0]


def test_plot_refuses_what_is_not_a_run(tmp_path, capsys):
    with pytest.raises(UserError, match="is not a folder"):
        plot_run(tmp_path / "missing")
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"dino plot: error: {tmp_path} has no training records yet (log.jsonl or "
                                       "steps.jsonl with at least one line); is it the train.output_dir of a run?\n")
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"dino plot: error: {tmp_path / 'log.jsonl'}, line 2: not a JSON record "
                                       "('not json')\n")


def test_dino_plot_draws_and_says_where(tmp_path, capsys):
    _write(tmp_path / "steps.jsonl", [_step(s, 1, 10.0 - s, 1e-4) for s in (20, 40, 60)])
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (f"{tmp_path / 'curves.png'}: 3 points up to step 60 (from steps.jsonl), "
                                       "no evaluation yet\n")
    assert _png_size(tmp_path / "curves.png") == (1500, 800)


def _hand_gt():
    """Two 100x100 images; cat 3 boxes, dog 2, owl 1, ant none."""
    boxes = [(1, 1, [10, 10, 20, 20]), (1, 1, [50, 50, 30, 30]), (2, 1, [0, 0, 40, 40]), (1, 2, [60, 10, 20, 30]),
             (2, 2, [50, 50, 40, 40]), (2, 3, [5, 60, 20, 20])]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [{"id": i + 1, "iscrowd": 0, "area": b[2] * b[3], "image_id": img, "category_id": c, "bbox": b}
                        for i, (img, c, b) in enumerate(boxes)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "owl"},
                       {"id": 4, "name": "ant"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


# Exact, shifted (IoU between .5 and .75) and wrong detections, so the curves at 0.5 and 0.75 differ.
PREDICTIONS = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
    {"image_id": 1, "category_id": 1, "bbox": [54, 54, 30, 30], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [60, 0, 30, 30], "score": 0.85},
    {"image_id": 1, "category_id": 2, "bbox": [60, 10, 20, 30], "score": 0.7},
    {"image_id": 2, "category_id": 2, "bbox": [55, 50, 40, 40], "score": 0.6},
    {"image_id": 2, "category_id": 3, "bbox": [5, 60, 20, 20], "score": 0.3},
    {"image_id": 2, "category_id": 4, "bbox": [0, 0, 10, 10], "score": 0.95},
]


def test_pr_curves_are_pycocotools_precision_and_are_drawn(tmp_path):
    gt = _hand_gt()
    stats = evaluate_coco(gt, PREDICTIONS, pr_curves=True)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(gt, gt.loadRes([dict(p) for p in PREDICTIONS]), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
    precision = reference.eval["precision"]  # (T, R, K, A, M): IoU .5:.05:.95, 101 recalls, cat/dog/owl/ant
    pr = stats["pr_curves"]
    assert pr["recall"] == pytest.approx(list(np.linspace(0, 1, 101)), abs=1e-12)
    assert pr["ious"] == [0.5, 0.75]
    assert pr["ground_truth"] == {"cat": 3, "dog": 2, "owl": 1, "ant": 0}
    assert list(pr["categories"]) == ["cat", "dog", "owl"]  # most ground truth first; ant has none
    for i, t in enumerate((0, 5)):  # IoU 0.5 and 0.75
        for k, name in enumerate(("cat", "dog", "owl")):
            assert pr["categories"][name][i] == pytest.approx(list(precision[t, :, k, 0, 2]), abs=1e-12)
        assert pr["all"][i] == pytest.approx(list(precision[t, :, :3, 0, 2].mean(1)), abs=1e-12)  # ant: -1, out
    assert not np.allclose(pr["all"][0], pr["all"][1])  # the shifted boxes count at 0.5 only
    assert np.mean(pr["all"][0]) == pytest.approx(stats["AP50"], abs=1e-12)
    assert np.mean(pr["all"][1]) == pytest.approx(stats["AP75"], abs=1e-12)

    drawn = plot_pr_curves(pr, tmp_path / "pr_curves.png", "hand-made")
    assert drawn.recall == pr["recall"] and drawn.all == pr["all"] and drawn.categories == pr["categories"]
    assert _png_size(tmp_path / "pr_curves.png") == (1200, 500)


def test_pr_curves_without_detections_or_ground_truth(tmp_path):
    pr = evaluate_coco(_hand_gt(), [], pr_curves=True)["pr_curves"]
    assert pr["all"] == [[0.0] * 101, [0.0] * 101] and list(pr["categories"]) == ["cat", "dog", "owl"]
    gt = _hand_gt()
    gt.dataset["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    pr = evaluate_coco(gt, PREDICTIONS[:1], pr_curves=True)["pr_curves"]
    assert pr["all"] == [[None] * 101, [None] * 101] and pr["categories"] == {}
    drawn = plot_pr_curves(pr, tmp_path / "pr.png")
    assert all(math.isnan(v) for v in drawn.all[0])
    assert _png_size(tmp_path / "pr.png") == (1200, 500)
