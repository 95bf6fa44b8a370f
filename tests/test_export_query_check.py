"""The query-by-query comparison: near-tied rank swaps do not count, real differences are found and located."""
from __future__ import annotations

import pytest
import torch

from dino.postprocess import postprocess
from dino_export.deploy_model import DeployOutputs
from dino_export.query_check import (
    FP32_TOLERANCE,
    ExportCheckError,
    QueryCheck,
    compare_detections,
    compare_queries,
    compare_selection,
)


def _reference(seed: int = 0) -> DeployOutputs:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 30, 4, generator=gen)
    logits[0, 3, 1] = 2.0  # two queries with near-tied top scores and far-apart boxes
    logits[0, 17, 1] = 2.0 + 1e-6
    boxes = torch.rand(2, 30, 4, generator=gen) * 0.5 + 0.25
    sizes = torch.tensor([[96.0, 128.0], [70.0, 128.0]])
    scores, labels, xyxy = postprocess(logits, boxes, sizes, 10)
    return DeployOutputs(xyxy, scores, labels, logits, boxes, sizes)


def test_rank_swap_of_near_tied_scores_is_no_difference():
    ref = _reference()
    boxes, scores, labels = ref.boxes.clone(), ref.scores.clone(), ref.labels.clone()
    # Swap ranks 0 and 1 of image 0 (the near tie): rank-by-rank the boxes differ by many pixels.
    for t in (boxes, scores, labels):
        t[0, [0, 1]] = t[0, [1, 0]]
    assert (boxes - ref.boxes).abs().max() > 5
    score, box = compare_detections(ref, boxes, scores, labels, FP32_TOLERANCE)
    assert box.value < 1e-4 and score.value < 2e-6  # float32 rounding of the xyxy conversion only


def test_a_moved_box_and_a_wrong_label_are_found_and_located():
    ref = _reference()
    boxes = ref.boxes.clone()
    boxes[1, 4, 2] += 3.0
    score, box = compare_detections(ref, boxes, ref.scores, ref.labels, FP32_TOLERANCE)
    assert box.value == pytest.approx(3.0, abs=1e-4) and box.where.startswith("image 1, detection 4")
    labels = ref.labels.clone()
    labels[0, 5] = (labels[0, 5] + 1) % 4
    score, box = compare_detections(ref, ref.boxes, ref.scores, labels, FP32_TOLERANCE)
    assert max(score.value / FP32_TOLERANCE.score, box.value / FP32_TOLERANCE.box_px) > 1


def test_a_missing_detection_shows_in_the_sorted_scores():
    ref = _reference()
    boxes, scores, labels = ref.boxes.clone(), ref.scores.clone(), ref.labels.clone()
    # Detection 0 replaced by a copy of detection 9: every detection still matches a query, the score list does not.
    for t in (boxes, scores, labels):
        t[0, 0] = t[0, 9]
    score, _ = compare_detections(ref, boxes, scores, labels, FP32_TOLERANCE)
    assert score.value > 1e-2 and "score rank" in score.where


def test_per_query_comparison_and_the_failure_message():
    ref = _reference()
    logits = ref.pred_logits.clone()
    logits[1, 12, 3] += 1.0
    score, box = compare_queries(ref, logits, ref.pred_boxes)
    assert score.where == "image 1, query 12, class 3" and box.value < 1e-4
    check = QueryCheck("ONNX Runtime CPU", 2, FP32_TOLERANCE, score, box)
    with pytest.raises(ExportCheckError, match=r"ONNX Runtime CPU disagrees with PyTorch \(batch 2\): largest "
                                               r"difference: per-query score 0\.\d+ at image 1, query 12, class 3 "
                                               r"\(tolerance 0\.0001\)"):
        check.raise_on_failure("PyTorch")


def _selection(indices: list[int], scores: list[float]) -> DeployOutputs:
    empty = torch.zeros(1, len(indices), 4)
    return DeployOutputs(empty, torch.zeros(1, len(indices)), torch.zeros(1, len(indices), dtype=torch.long),
                         torch.zeros(1, len(indices), 2), empty, torch.tensor([[64.0, 64.0]]),
                         torch.tensor([indices]), torch.logit(torch.tensor([scores])))


def test_a_selection_differing_only_by_near_ties_passes_and_a_wrong_pick_is_found():
    # PyTorch's own top-4 (tokens 7, 3, 9, 1) and its scores.
    reference = _selection([7, 3, 9, 1], [0.9, 0.5, 0.30000001, 0.3])
    # A graph that ranked the near-tied tokens 9 and 1 the other way: PyTorch's scores of its picks, in its order.
    swapped = _selection([7, 3, 1, 9], [0.9, 0.5, 0.3, 0.30000001])
    diff, differ = compare_selection(reference, swapped)
    assert differ == 2 and diff.value < 1e-7
    # A graph that picked token 5 (PyTorch score 0.2) instead of token 1: a real difference, located by rank.
    wrong = _selection([7, 3, 9, 5], [0.9, 0.5, 0.30000001, 0.2])
    diff, differ = compare_selection(reference, wrong)
    assert differ == 1 and diff.value == pytest.approx(0.1, abs=1e-6)
    assert diff.where == "image 0, query 3 (selection rank)"
    check = QueryCheck("graph", 1, FP32_TOLERANCE, selection_score=diff)
    with pytest.raises(ExportCheckError, match=r"largest difference: query selection score 0.1 at image 0, query 3"):
        check.raise_on_failure("PyTorch")
