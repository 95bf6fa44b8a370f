import itertools

import pytest
import torch

from dino.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from dino.matcher import HungarianMatcher, matching_cost


def _random_case(seed, batch, num_queries, num_classes, sizes):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes, generator=g, dtype=torch.float64),
        "pred_boxes": torch.rand(batch, num_queries, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25,
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25,
        }
        for n in sizes
    ]
    return outputs, targets


def _brute_force_cost(cost):
    """Minimum total cost over all injective target -> query assignments."""
    num_queries, num_targets = cost.shape
    return min(
        sum(cost[q, t].item() for t, q in enumerate(perm))
        for perm in itertools.permutations(range(num_queries), num_targets)
    )


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    outputs, targets = _random_case(seed, batch=2, num_queries=5, num_classes=4, sizes=[3, 2])
    matcher = HungarianMatcher(2.0, 5.0, 2.0, 0.25)
    indices = matcher(outputs, targets)
    for i, (rows, cols) in enumerate(indices):
        n = len(targets[i]["labels"])
        assert len(rows) == len(cols) == n
        assert sorted(cols.tolist()) == list(range(n))
        assert len(set(rows.tolist())) == n
        cost = matching_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i], targets[i]["labels"], targets[i]["boxes"])
        assert cost[rows, cols].sum().item() == pytest.approx(_brute_force_cost(cost), abs=1e-12)


def test_cost_terms_follow_official_formula():
    outputs, targets = _random_case(1, batch=1, num_queries=4, num_classes=3, sizes=[2])
    logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    labels, tboxes = targets[0]["labels"], targets[0]["boxes"]
    p = logits.sigmoid()
    pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
    neg = 0.75 * p**2 * -(1 - p + 1e-8).log()
    l1 = (boxes[:, None, :] - tboxes[None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tboxes))
    expected = 2 * (pos[:, labels] - neg[:, labels]) + 5 * l1 - 2 * giou
    torch.testing.assert_close(matching_cost(logits, boxes, labels, tboxes), expected)


def test_perfect_query_is_chosen():
    outputs, targets = _random_case(2, batch=1, num_queries=6, num_classes=3, sizes=[1])
    outputs["pred_boxes"][0, 4] = targets[0]["boxes"][0]
    outputs["pred_logits"][0, 4, targets[0]["labels"][0]] = 10.0
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert rows.tolist() == [4] and cols.tolist() == [0]


def test_empty_targets():
    outputs, targets = _random_case(3, batch=2, num_queries=5, num_classes=3, sizes=[0, 2])
    indices = HungarianMatcher()(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 2


def test_more_targets_than_queries_matches_every_query():
    outputs, targets = _random_case(4, batch=1, num_queries=2, num_classes=3, sizes=[4])
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert sorted(rows.tolist()) == [0, 1] and len(set(cols.tolist())) == 2


def test_bad_input_errors():
    outputs, targets = _random_case(5, batch=2, num_queries=5, num_classes=3, sizes=[1, 1])
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(outputs, targets[:1])
    outputs["pred_boxes"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image 1"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)


def test_half_precision_outputs_match_like_float32():
    outputs, targets = _random_case(6, batch=2, num_queries=5, num_classes=3, sizes=[2, 3])
    half = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    as_float = {k: v.float() for k, v in half.items()}
    for (r1, c1), (r2, c2) in zip(HungarianMatcher()(half, targets), HungarianMatcher()(as_float, targets)):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
