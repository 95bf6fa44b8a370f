"""COCO AP helpers: perfect/wrong/empty predictions, labels without a category, the 12-line table."""
import contextlib
import io
import logging

import pytest
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from dino.config import DataConfig
from dino.data import (
    STAT_NAMES,
    CocoDetection,
    build_dataset,
    coco_gt,
    evaluate_coco,
    format_ap_table,
    format_per_category,
    predictions_to_coco,
)
from tests.test_data_coco import ann, make_dataset


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("shapes") / "ds"), shapes_train_images=1, shapes_val_images=6,
                     shapes_image_size=64, val_scale=96, val_max_size=200)
    return build_dataset(cfg, "val")


def _perfect_results(ds, shift=0.0):
    """Ground truth as post-processed predictions (xyxy pixels in orig_size), boxes optionally shifted right."""
    results, image_ids = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        h, w = target["orig_size"].tolist()
        boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        boxes[:, 0::2] += shift
        results.append({"scores": torch.linspace(0.9, 0.5, len(boxes)), "labels": target["labels"], "boxes": boxes})
        image_ids.append(target["image_id"])
    return results, image_ids


def test_perfect_predictions_give_ap_one(val_set):
    results, ids = _perfect_results(val_set)
    stats = evaluate_coco(coco_gt(val_set), predictions_to_coco(results, ids, val_set.label_to_category_id))
    assert list(stats) == [*STAT_NAMES, "per_category"]
    assert stats["per_category"] == pytest.approx({"rectangle": 1.0, "ellipse": 1.0, "triangle": 1.0})
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


def test_wrong_predictions_give_ap_near_zero(val_set):
    results, ids = _perfect_results(val_set, shift=40.0)  # boxes far from the objects
    assert evaluate_coco(coco_gt(val_set), predictions_to_coco(results, ids, val_set.label_to_category_id))["AP50"] < 0.05
    results, ids = _perfect_results(val_set)
    for r in results:  # right boxes, wrong classes
        r["labels"] = r["labels"] % 3 + 1  # shapes ids 1..3: 1 -> 2 -> 3 -> 1
    assert evaluate_coco(coco_gt(val_set), predictions_to_coco(results, ids, val_set.label_to_category_id))["AP"] < 0.05


def test_labels_without_a_category_are_not_evaluated(val_set):
    """Labels are category ids; label 0 (no shapes category, like COCO's unused ids) is dropped, not scored."""
    results, ids = _perfect_results(val_set)
    coco = predictions_to_coco(results, ids, val_set.label_to_category_id)
    for r in results:
        r["labels"] = torch.cat([r["labels"], torch.zeros(1, dtype=torch.int64)])
        r["boxes"] = torch.cat([r["boxes"], r["boxes"][:1]])
        r["scores"] = torch.cat([r["scores"], torch.ones(1)])
    assert predictions_to_coco(results, ids, val_set.label_to_category_id) == coco
    assert len(predictions_to_coco(results, ids, None)) == len(coco) + len(ids)


def test_empty_predictions_are_all_zero(val_set):
    stats = evaluate_coco(coco_gt(val_set), [])
    assert stats == {**{name: 0.0 for name in STAT_NAMES},
                     "per_category": {"rectangle": 0.0, "ellipse": 0.0, "triangle": 0.0}}
    assert predictions_to_coco([], [], val_set.label_to_category_id) == []


def test_restricting_to_evaluated_images(val_set):
    results, ids = _perfect_results(val_set)
    half = predictions_to_coco(results[:3], ids[:3], val_set.label_to_category_id)
    assert evaluate_coco(coco_gt(val_set), half)["AR100"] < 0.9  # unevaluated images count as misses
    assert evaluate_coco(coco_gt(val_set), half, image_ids=ids[:3])["AP"] == pytest.approx(1.0)


def test_predictions_to_coco_converts_boxes_and_labels():
    results = [{"scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 5]),
                "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 1.0, 2.0], [1.0, 1.0, 2.0, 2.0]])}]
    out = predictions_to_coco(results, [42], {0: 3, 1: 7})  # label 5 has no category: dropped
    assert out == [
        {"image_id": 42, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 7, "bbox": [0.0, 0.0, 1.0, 2.0], "score": pytest.approx(0.8)},
    ]
    assert [p["category_id"] for p in predictions_to_coco(results, [42], [3, 7, 8, 9, 10, 11])] == [3, 7, 11]
    with pytest.raises(ValueError, match="2 results but 1 image ids"):
        predictions_to_coco(results * 2, [42])


def test_unknown_image_id_is_an_error(val_set):
    with pytest.raises(ValueError, match="not in the ground truth: \\[999\\]"):
        evaluate_coco(coco_gt(val_set), [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])


def test_table_matches_pycocotools_summary(val_set):
    results, ids = _perfect_results(val_set, shift=3.0)
    preds = predictions_to_coco(results, ids, val_set.label_to_category_id)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        stats = evaluate_coco(coco_gt(val_set), preds)
    assert quiet.getvalue() == ""  # pycocotools' prints silenced
    loud = io.StringIO()
    with contextlib.redirect_stdout(loud):
        evaluate_coco(coco_gt(val_set), preds, verbose=True)
    table = format_ap_table(stats)
    assert len(table.splitlines()) == 12
    printed = [line for line in loud.getvalue().splitlines() if line.startswith(" Average")]
    assert table.splitlines() == printed
    assert 0.0 < stats["AP"] < stats["AP50"] <= 1.0
    with pytest.raises(ValueError, match="AR100"):
        format_ap_table({k: v for k, v in stats.items() if k != "AR100"})


def test_coco_gt_through_subset(val_set):
    subset = torch.utils.data.Subset(val_set, [0, 1])
    assert coco_gt(subset) is coco_gt(val_set)
    with pytest.raises(TypeError, match="no COCO ground truth"):
        coco_gt([1, 2, 3])


def _hand_gt(annotations):
    """pycocotools ground truth: two 100x100 images, categories 1 "cat", 2 "dog", 3 "owl", 4 "ant"."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [{"id": i + 1, "iscrowd": 0, "area": b[2] * b[3], "image_id": img, "category_id": c, "bbox": b}
                        for i, (img, c, b) in enumerate(annotations)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "owl"},
                       {"id": 4, "name": "ant"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def test_per_category_ap_by_hand():
    """cat: 1 box found exactly -> AP 1. dog: 2 boxes, 1 found exactly (the top score) -> precision 1 up to recall
    0.5, none beyond: 51 of pycocotools' 101 recall points -> AP 51/101. ant: 1 box, no detection -> 0. owl: no
    ground truth -> None (pycocotools' -1). The table's AP is the mean over the three with ground truth."""
    gt = _hand_gt([(1, 1, [10, 10, 20, 20]), (1, 2, [50, 50, 30, 30]), (2, 2, [0, 0, 40, 40]),
                   (2, 4, [60, 60, 10, 10])])
    predictions = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "score": 0.8},
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 40], "score": 0.7},  # an owl where there is none
    ]
    stats = evaluate_coco(gt, predictions)
    assert stats["per_category"] == pytest.approx({"cat": 1.0, "dog": 51 / 101, "owl": None, "ant": 0.0}, abs=1e-12)
    assert stats["AP"] == pytest.approx((1.0 + 51 / 101 + 0.0) / 3, abs=1e-12)
    assert format_per_category(stats["per_category"]).splitlines() == [
        " Per-category Average Precision (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]:",
        "  cat = 1.000",
        "  dog = 0.505",
        "  owl = n/a (no ground truth)",
        "  ant = 0.000",
    ]


def test_no_ground_truth_warns(caplog):
    predictions = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    with caplog.at_level(logging.WARNING, logger="dino.data"):
        stats = evaluate_coco(_hand_gt([]), predictions)
    assert [stats[name] for name in STAT_NAMES] == [-1.0] * 12
    assert stats["per_category"] == {"cat": None, "dog": None, "owl": None, "ant": None}
    assert [r.getMessage() for r in caplog.records] == [
        "the evaluated images have no ground-truth boxes (no annotations, or only crowd ones): every AP and AR is "
        "undefined (-1, or 0 without detections)"
    ]


def test_boxes_dropped_from_training_are_not_ground_truth_either(tmp_path, caplog):
    """A zero-width box (area 0) would be ground truth no detection can match to pycocotools: recall 1/2. It is
    dropped from training, so evaluation leaves it out too, and finding the one real object is AP 1."""
    images_dir, path = make_dataset(tmp_path, annotations=[ann(1, [10, 10, 20, 20]), ann(2, [40, 10, 0, 20]),
                                                           ann(3, [40, 10, -8, 20])])
    with caplog.at_level(logging.WARNING, logger="dino.data"):
        ds = CocoDetection(images_dir, path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: dropped 2 box(es) from training and from the evaluation ground truth (1 negative width, 1 zero "
        "width; annotation ids 2, 3)"
    ]
    found = [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20], "score": 0.9}]
    stats = evaluate_coco(coco_gt(ds), found)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
