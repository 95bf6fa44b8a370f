"""Hungarian matching of predicted queries to ground-truth boxes (scipy's linear_sum_assignment).

The cost is the official DINO one: ``cost_class * focal_class_cost + cost_bbox * L1 + cost_giou * (-GIoU)``.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dino.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# The official class cost uses gamma 2 regardless of the loss's gamma.
_COST_GAMMA = 2.0
# Keeps log() finite for probabilities that round to 0 or 1 (official value).
_LOG_EPS = 1e-8


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = _COST_GAMMA) -> Tensor:
    """Focal-style classification cost of assigning each query to each target.

    Args:
        logits: (Q, C) class logits of one image.
        labels: (N,) int64 target labels in [0, C).
    Returns:
        (Q, N) cost: focal loss of the query if it were the positive for the target's class, minus its focal loss as
        a negative for that class (lower is better).
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + _LOG_EPS).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + _LOG_EPS).log()
    return pos[:, labels] - neg[:, labels]


def matching_cost(
    logits: Tensor,
    boxes: Tensor,
    tgt_labels: Tensor,
    tgt_boxes: Tensor,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    focal_alpha: float = 0.25,
) -> Tensor:
    """Total matching cost of one image.

    Args:
        logits: (Q, C) class logits; boxes: (Q, 4) cxcywh in [0, 1].
        tgt_labels: (N,) int64; tgt_boxes: (N, 4) cxcywh in [0, 1].
    Returns:
        (Q, N) cost matrix.
    """
    cls = focal_class_cost(logits, tgt_labels, focal_alpha)
    l1 = torch.cdist(boxes, tgt_boxes, p=1)
    giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return cost_bbox * l1 + cost_class * cls + cost_giou * giou


class NonFinitePredictionError(ValueError):
    """The model's predictions hold NaN/inf (a diverged model, not bad targets)."""


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising :func:`matching_cost`, image by image."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, focal_alpha: float = 0.25):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Matches each image's queries to its targets.

        Args:
            outputs: ``pred_logits (B, Q, C)``, ``pred_boxes (B, Q, 4)`` cxcywh in [0, 1]; other keys are ignored.
            targets: B dicts with ``labels (N_i,)`` int64 and ``boxes (N_i, 4)`` cxcywh in [0, 1].
        Returns:
            B pairs ``(query_idx, target_idx)``, int64 CPU tensors of length min(Q, N_i); query_idx is sorted.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(
                f"pred_logits must be (B, Q, C) and pred_boxes (B, Q, 4); got {tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} predictions")
        if logits.dtype not in (torch.float32, torch.float64):
            # Half-precision costs tie often and cannot go through numpy; the assignment deserves float32.
            logits, boxes = logits.float(), boxes.float()
        sizes = [len(t["labels"]) for t in targets]
        batch, num_queries = logits.shape[:2]
        if sum(sizes) == 0:
            return [(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)) for _ in targets]
        # One cost matrix for the whole batch and a single device-to-host copy, as official; the blocks off the
        # image diagonal are wasted but cheap next to the sync each per-image copy would cost.
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)
        cost = matching_cost(
            logits.flatten(0, 1), boxes.flatten(0, 1), tgt_labels, tgt_boxes,
            self.cost_class, self.cost_bbox, self.cost_giou, self.focal_alpha,
        )
        cost = cost.view(batch, num_queries, -1).cpu()
        indices = []
        for i, block in enumerate(cost.split(sizes, -1)):
            image_cost = block[i]
            if not torch.isfinite(image_cost).all():
                if not (torch.isfinite(logits[i]).all() and torch.isfinite(boxes[i]).all()):
                    raise NonFinitePredictionError(
                        f"matching cost of image {i} is not finite: the predictions (pred_logits/pred_boxes) hold NaN/inf"
                    )
                raise ValueError(
                    f"matching cost of image {i} is not finite: targets[{i}]['boxes'] hold NaN/inf or degenerate boxes"
                )
            rows, cols = linear_sum_assignment(image_cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(cfg) -> HungarianMatcher:
    """Builds the matcher from a :class:`dino.config.MatcherConfig`."""
    return HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou, cfg.focal_alpha)
