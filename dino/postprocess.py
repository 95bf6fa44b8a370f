"""Top-k post-processing of DINO outputs into scored, labelled pixel boxes (no NMS, as official).

:func:`postprocess` is pure tensor code without Python loops over the batch or numpy, so it can sit inside an
exported (ONNX / TensorRT) graph.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dino.box_ops import box_cxcywh_to_xyxy
from dino.errors import UserError


def postprocess(
    pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor, num_select: int = 300
) -> tuple[Tensor, Tensor, Tensor]:
    """Selects the ``num_select`` best (query, class) pairs of each image.

    Args:
        pred_logits: (B, Q, C) class logits.
        pred_boxes: (B, Q, 4) cxcywh normalised to [0, 1] by the image size.
        target_sizes: (B, 2) (height, width) in pixels of the images the boxes are scaled to.
        num_select: K; capped at Q * C.
    Returns:
        scores (B, K) sigmoid probabilities, descending; labels (B, K) int64 class indices;
        boxes (B, K, 4) xyxy in pixels. Query index = flat index // C, label = flat index % C.
    """
    if pred_logits.dim() != 3 or pred_boxes.dim() != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            f"pred_logits must be (B, Q, C) and pred_boxes (B, Q, 4); got {tuple(pred_logits.shape)}, "
            f"{tuple(pred_boxes.shape)}"
        )
    if target_sizes.dim() != 2 or target_sizes.shape[1] != 2:
        raise ValueError(f"target_sizes must be (B, 2) as (height, width), got {tuple(target_sizes.shape)}")
    if num_select < 1:
        raise ValueError(f"num_select must be >= 1, got {num_select}")
    batch, num_queries, num_classes = pred_logits.shape
    k = min(num_select, num_queries * num_classes)

    prob = pred_logits.sigmoid().reshape(batch, num_queries * num_classes)
    scores, flat_idx = torch.topk(prob, k, dim=1)
    query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
    labels = flat_idx % num_classes

    boxes = box_cxcywh_to_xyxy(pred_boxes)
    boxes = torch.gather(boxes, 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
    img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return scores, labels, boxes * scale[:, None, :]


class PostProcess(nn.Module):
    """Module form of :func:`postprocess` returning one dict per image (the COCO-evaluation format)."""

    def __init__(self, num_select: int = 300):
        super().__init__()
        if num_select < 1:
            raise UserError(f"model.num_select must be >= 1 (detections kept per image), got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``outputs``: ``pred_logits (B, Q, C)``, ``pred_boxes (B, Q, 4)``; ``target_sizes (B, 2)`` (h, w) pixels.

        Returns B dicts ``scores (K,)``, ``labels (K,)`` int64, ``boxes (K, 4)`` xyxy pixels.
        """
        logits = outputs["pred_logits"]
        if target_sizes.shape[0] != logits.shape[0]:
            raise ValueError(f"target_sizes has {target_sizes.shape[0]} rows for a batch of {logits.shape[0]}")
        scores, labels, boxes = postprocess(logits, outputs["pred_boxes"], target_sizes, self.num_select)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
