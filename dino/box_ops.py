"""Box format conversions (``torchvision.ops``) and generalised IoU as official DINO computes it.

Formats: ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is (left, top, right, bottom). The model
predicts ``cxcywh`` normalised to [0, 1] by the unpadded image size; the losses and post-processing need ``xyxy``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_convert


def _check_last_dim(boxes: Tensor, name: str) -> None:
    if boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have 4 coordinates in its last dimension, got shape {tuple(boxes.shape)}")


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Converts ``boxes: (..., 4)`` cxcywh to ``(..., 4)`` xyxy, in the same units."""
    _check_last_dim(boxes, "boxes")
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Converts ``boxes: (..., 4)`` xyxy to ``(..., 4)`` cxcywh, in the same units."""
    _check_last_dim(boxes, "boxes")
    return box_convert(boxes, "xyxy", "cxcywh")


# Official DINO adds this to the union and to the enclosing area (torchvision adds nothing). It moves the GIoU of
# small boxes by ~1e-5, far beyond float64 rounding, so parity with the official losses needs it.
GIOU_EPS = 1e-6


def _giou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """GIoU of broadcast-compatible xyxy boxes ``(..., 4)``."""
    area1 = box_area(boxes1.reshape(-1, 4)).reshape(boxes1.shape[:-1])
    area2 = box_area(boxes2.reshape(-1, 4)).reshape(boxes2.shape[:-1])
    inter_wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter
    hull_wh = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / (union + eps) - (hull - union) / (hull + eps)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = GIOU_EPS) -> Tensor:
    """Pairwise GIoU of ``boxes1: (N, 4)`` and ``boxes2: (M, 4)``, both xyxy; returns ``(N, M)`` in [-1, 1].

    ``eps`` is added to the union and the enclosing area as in official DINO (``eps=0`` gives torchvision's
    ``generalized_box_iou``). Boxes must have x2 >= x1 and y2 >= y1 (not checked: it would cost a device sync).
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    return _giou(boxes1[:, None, :], boxes2[None, :, :], eps)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = GIOU_EPS) -> Tensor:
    """GIoU of corresponding pairs ``boxes1[i]``, ``boxes2[i]``: ``(N, 4)`` xyxy each -> ``(N,)``.

    The same numbers as the diagonal of :func:`generalized_box_iou` without building the N x N matrix.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} must have the same shape")
    return _giou(boxes1, boxes2, eps)
