"""COCO box AP with pycocotools: predictions -> COCO results, the 12 summary stats and their standard table, and
the AP of each category."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "STAT_NAMES",
    "coco_gt",
    "evaluate_coco",
    "format_ap_table",
    "format_per_category",
    "ground_truth_counts",
    "predictions_to_coco",
]

logger = logging.getLogger("dino.data")
_AREA_ALL = (0.0, 1e5**2)  # pycocotools' "all" area range

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# (kind, IoU, area, maxDets) of each stat, in pycocotools' summarize() order.
_STAT_ROWS = (
    ("AP", "0.50:0.95", "all", 100),
    ("AP", "0.50", "all", 100),
    ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100),
    ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1),
    ("AR", "0.50:0.95", "all", 10),
    ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100),
    ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
)


def coco_gt(dataset: Any):
    """The pycocotools ``COCO`` ground truth of a :class:`~dino.data.coco.CocoDetection` (also through ``Subset``)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if not hasattr(dataset, "coco"):
        raise TypeError(f"coco_gt: {type(dataset).__name__} has no COCO ground truth (expected CocoDetection)")
    return dataset.coco


def label_to_category(dataset: Any) -> dict[int, int]:
    """The dataset's ``label_to_category_id`` mapping (also through ``Subset``)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dict(dataset.label_to_category_id)


def predictions_to_coco(
    results: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
) -> list[dict]:
    """COCO result dicts from post-processed predictions.

    Args:
        results: per image ``{"scores": (K,), "labels": (K,) int64, "boxes": (K, 4) xyxy pixels in orig_size}``
            (the output of ``PostProcess`` called with ``orig_size`` as the target size).
        image_ids: the COCO image id of each result.
        label_to_category_id: label -> category id (``dataset.label_to_category_id``); None: labels are category ids.
            Predictions whose label has no category (e.g. label 0 with the official 91-class mapping) are dropped.
    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}, ...]``.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"predictions_to_coco: {len(results)} results but {len(image_ids)} image ids")
    if label_to_category_id is not None and not isinstance(label_to_category_id, Mapping):
        label_to_category_id = dict(enumerate(label_to_category_id))
    out = []
    for result, image_id in zip(results, image_ids):
        boxes = result["boxes"].detach().float().cpu().reshape(-1, 4)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = result["scores"].detach().float().cpu().tolist()
        labels = result["labels"].detach().cpu().tolist()
        if not len(xywh) == len(scores) == len(labels):
            raise ValueError(
                f"predictions_to_coco: image {image_id} has {len(xywh)} boxes, {len(scores)} scores, "
                f"{len(labels)} labels"
            )
        for box, score, label in zip(xywh, scores, labels):
            if label_to_category_id is None:
                category_id = int(label)
            elif label in label_to_category_id:
                category_id = int(label_to_category_id[label])
            else:
                continue
            out.append({"image_id": int(image_id), "category_id": category_id, "bbox": box, "score": float(score)})
    return out


def ground_truth_counts(coco_gt: Any, image_ids: Sequence[int] | None = None) -> dict[int, int]:
    """``{category id: ground-truth boxes pycocotools scores}`` over ``image_ids`` (default all): not crowd, area in
    the "all" range. A category with 0 has no AP (pycocotools' -1)."""
    images = None if image_ids is None else set(int(i) for i in image_ids)
    counts = {int(c): 0 for c in coco_gt.getCatIds()}
    for ann in coco_gt.dataset["annotations"]:
        if images is not None and ann["image_id"] not in images:
            continue
        if not ann.get("iscrowd", 0) and _AREA_ALL[0] <= ann["area"] <= _AREA_ALL[1]:
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return counts


def _category_names(coco_gt: Any) -> dict[int, str]:
    """``{id: name}``; a name used by several categories gets its id appended, so every key is unique."""
    cats = {int(c["id"]): str(c.get("name", f"class {c['id']}")) for c in coco_gt.loadCats(coco_gt.getCatIds())}
    names = list(cats.values())
    return {cid: name if names.count(name) == 1 else f"{name} (id {cid})" for cid, name in cats.items()}


def _per_category_ap(evaluator: Any, names: dict[int, str]) -> dict[str, float | None]:
    """AP at IoU .50:.95, area "all", 100 detections per category, from the accumulated precision array
    ``(T iou, R recall, K categories, A areas, M max dets)``; None (pycocotools' -1) for a category without ground
    truth. The mean over categories that have one is the table's first line."""
    precision = evaluator.eval["precision"]
    params = evaluator.params
    area, dets = params.areaRngLbl.index("all"), params.maxDets.index(100)
    out = {}
    for k, cid in enumerate(params.catIds):
        values = precision[:, :, k, area, dets]
        values = values[values > -1]
        out[names[int(cid)]] = float(values.mean()) if values.size else None
    return out


# The categories drawn apart in the precision-recall curves: those with the most ground-truth boxes.
PR_CATEGORIES = 5


def _pr_curves(precision: np.ndarray, params: Any, names: dict[int, str], counts: dict[int, int]) -> dict:
    """Precision against recall at IoU 0.5 and 0.75 (area "all", 100 detections) from the accumulated ``precision``
    ``(T iou, R recall, K categories, A areas, M max dets)``::

        {"recall": [R thresholds], "ious": [0.5, 0.75], "ground_truth": {name: boxes of every category},
         "all": [[R precisions] per IoU], "categories": {name: [[R precisions] per IoU]}}

    "all" is the mean over the categories with ground truth at each recall (its mean over recall is AP50 / AP75);
    None where no category has ground truth. "categories" holds the :data:`PR_CATEGORIES` categories with the most
    ground-truth boxes, most first."""
    ious = [0.5, 0.75]
    area, dets = params.areaRngLbl.index("all"), params.maxDets.index(100)
    rows = [int(np.argmin(np.abs(np.asarray(params.iouThrs) - iou))) for iou in ious]
    cat_ids = [int(c) for c in params.catIds]
    largest = sorted((c for c in cat_ids if counts.get(c, 0) > 0), key=lambda c: -counts[c])[:PR_CATEGORIES]

    def curves(columns: list[int]) -> list[list[float | None]]:
        out = []
        for t in rows:
            values = np.asarray(precision[t, :, :, area, dets], dtype=float)[:, columns]  # (R, K')
            valid = values > -1  # pycocotools' -1: the category has no ground truth
            mean = np.where(valid, values, 0.0).sum(1) / np.maximum(valid.sum(1), 1)
            out.append([float(v) if ok else None for v, ok in zip(mean, valid.any(1))])
        return out

    return {"recall": [float(r) for r in params.recThrs], "ious": ious,
            "ground_truth": {names[c]: counts.get(c, 0) for c in cat_ids},
            "all": curves(list(range(len(cat_ids)))),
            "categories": {names[c]: curves([cat_ids.index(c)]) for c in largest}}


def evaluate_coco(
    coco_gt: Any,
    predictions: Sequence[dict],
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
    pr_curves: bool = False,
) -> dict[str, Any]:
    """Box AP of COCO result dicts against ``coco_gt``: the 12 stats named in :data:`STAT_NAMES` and
    ``"per_category"``, ``{category name: AP at IoU .50:.95, area all, 100 detections, or None without ground truth}``;
    with ``pr_curves`` also ``"pr_curves"``, the precision-recall curves at IoU 0.5 and 0.75 (:func:`_pr_curves`).

    ``image_ids`` restricts evaluation to those images (e.g. when only part of the val set was run); default all.
    Empty predictions give all zeros (and 0.0 for each category with ground truth). pycocotools' prints are silenced
    unless ``verbose``. A stat with no ground truth in its area range is -1, as pycocotools reports it; when the
    evaluated images have no ground truth at all, a warning says so.
    """
    from pycocotools.cocoeval import COCOeval, Params

    counts = ground_truth_counts(coco_gt, image_ids)
    if not any(counts.values()):
        logger.warning("the evaluated images have no ground-truth boxes (no annotations, or only crowd ones): "
                       "every AP and AR is undefined (-1, or 0 without detections)")
    names = _category_names(coco_gt)
    if not predictions:
        per_category = {names[cid]: (0.0 if n else None) for cid, n in sorted(counts.items())}
        stats = {**{name: 0.0 for name in STAT_NAMES}, "per_category": per_category}
        if pr_curves:  # no detection: precision 0 at every recall for each category with ground truth
            params = Params(iouType="bbox")
            params.catIds = sorted(counts)
            shape = (len(params.iouThrs), len(params.recThrs), len(params.catIds), len(params.areaRng),
                     len(params.maxDets))
            precision = np.zeros(shape) - np.array([counts[c] == 0 for c in params.catIds])[None, None, :, None, None]
            stats["pr_curves"] = _pr_curves(precision, params, names, counts)
        return stats
    known = set(coco_gt.getImgIds())
    unknown = {p["image_id"] for p in predictions} - known
    if unknown:
        raise ValueError(f"evaluate_coco: predictions for image ids not in the ground truth: {sorted(unknown)[:10]}")
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        # loadRes adds fields to the dicts it is given; keep the caller's list untouched.
        coco_dt = coco_gt.loadRes(copy.deepcopy(list(predictions)))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, np.asarray(evaluator.stats, dtype=float))}
    stats["per_category"] = _per_category_ap(evaluator, names)
    if pr_curves:
        stats["pr_curves"] = _pr_curves(evaluator.eval["precision"], evaluator.params, names, counts)
    return stats


def format_ap_table(stats: Mapping[str, float]) -> str:
    """The standard 12-line pycocotools summary for stats named as in :data:`STAT_NAMES`."""
    missing = [name for name in STAT_NAMES if name not in stats]
    if missing:
        raise ValueError(f"format_ap_table: stats lack {missing}")
    lines = []
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, _STAT_ROWS):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(
            f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {stats[name]:0.3f}"
        )
    return "\n".join(lines)


def format_per_category(per_category: Mapping[str, float | None]) -> str:
    """``per_category`` AP as lines ``" AP <name>  = 0.512"`` (``n/a``: no ground truth), names aligned."""
    width = max((len(name) for name in per_category), default=0)
    lines = [" Per-category Average Precision (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]:"]
    for name, ap in per_category.items():
        shown = "n/a (no ground truth)" if ap is None or not math.isfinite(ap) else f"{ap:0.3f}"
        lines.append(f"  {name:<{width}} = {shown}")
    return "\n".join(lines)
