"""Box format conversions and generalised IoU, thin wrappers over ``torchvision.ops``.

Formats: ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is (left, top, right, bottom). The model
predicts ``cxcywh`` normalised to [0, 1] by the unpadded image size; the losses and post-processing need ``xyxy``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.ops import generalized_box_iou as _pairwise_giou


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


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU of ``boxes1: (N, 4)`` and ``boxes2: (M, 4)``, both xyxy; returns ``(N, M)`` in [-1, 1].

    Boxes must have x2 >= x1 and y2 >= y1 (not checked here: it would cost a device sync on every call).
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    return _pairwise_giou(boxes1, boxes2)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of corresponding pairs ``boxes1[i]``, ``boxes2[i]``: ``(N, 4)`` xyxy each -> ``(N,)``.

    Gives the same numbers as the diagonal of :func:`generalized_box_iou` without building the N x N matrix
    (torchvision's batched form with a batch of N one-box sets).
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} must have the same shape")
    return _pairwise_giou(boxes1[:, None, :], boxes2[:, None, :])[:, 0, 0]
