"""Contrastive denoising (CDN): noised copies of the ground truth as extra decoder queries, and their mask.

Layout (official CDN, ``docs/ARCHITECTURE.md``): with ``max_gt`` the most boxes of any image in the batch and G
groups, the ``pad_size = 2 * max_gt * G`` denoising slots come first; group g occupies
``[g * 2 * max_gt, (g + 1) * 2 * max_gt)``, positives in its first ``max_gt`` slots (image i's n_i boxes in
order in slots 0..n_i-1), negatives in the next ``max_gt``. The matching queries follow.
"""
from __future__ import annotations

import torch
from torch import nn

from dino.errors import UserError
from dino.models.anchors import inverse_sigmoid


def build_dn_attn_mask(max_gt: int, num_groups: int, num_queries: int, device=None) -> torch.Tensor:
    """Self-attention mask for ``pad_size + num_queries`` decoder queries; True means "may not attend".

    Matching queries may not see any denoising query (they would see the answers); each denoising group sees
    itself and the matching queries but no other group.

    Returns:
        (pad_size + num_queries, pad_size + num_queries) bool, pad_size = 2 * max_gt * num_groups.
    """
    pad = 2 * max_gt * num_groups
    size = pad + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    group = torch.arange(pad, device=device) // max(2 * max_gt, 1)
    mask[:pad, :pad] = group[:, None] != group[None, :]
    return mask


def num_dn_groups(dn_number: int, max_gt: int) -> int:
    """Groups that fit the budget of ``dn_number`` positive queries: ``dn_number // max_gt``, at least 1."""
    return max(1, dn_number // max(max_gt, 1))


def build_cdn_queries(
    targets: list[dict[str, torch.Tensor]],
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    label_enc: nn.Embedding,
    num_queries: int,
    generator: torch.Generator | None = None,
):
    """Builds the noised denoising queries for a batch.

    Args:
        targets: B dicts with ``labels (N_i,) int64`` and ``boxes (N_i, 4)`` cxcywh in [0, 1].
        dn_number: budget of positive denoising queries per image (groups = dn_number // max_gt).
        label_noise_ratio: a label is replaced by a uniform random class with probability ratio / 2.
        box_noise_scale: corner jitter as a fraction of half the box size; positives move < 1x, negatives 1x-2x.
        num_classes: range of the random replacement labels; target labels must lie in ``[0, num_classes)``.
        label_enc: (labelbook_size + 1, C) label embedding giving the content queries; labelbook_size >= num_classes.
        num_queries: number of matching queries (for the attention mask).
    Returns:
        ``None`` when no image has a box, else ``(query_label (B, pad, C), query_bbox (B, pad, 4) logit space,
        attn_mask (pad + Q, pad + Q) bool, dn_meta {"pad_size", "num_dn_group"})``. Unused slots are zeros.
    """
    book = label_enc.num_embeddings - 1  # labelbook_size
    if num_classes > book:
        # Replacement labels are drawn in [0, num_classes): they would index past the book at random steps.
        raise UserError(
            f"denoising: model.num_classes={num_classes} is larger than the label book "
            f"(model.denoising.labelbook_size={book}); set model.denoising.labelbook_size={num_classes}"
        )
    device = label_enc.weight.device
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts, default=0)
    if max_gt == 0:
        return None
    groups = num_dn_groups(dn_number, max_gt)
    batch = len(targets)
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=label_enc.weight.dtype)
    batch_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
    n = labels.numel()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"denoising: target labels must be in [0, model.num_classes={num_classes}), "
            f"got min {int(labels.min())} max {int(labels.max())}"
        )

    # Copy c = 2g is group g's positive copy, c = 2g + 1 its negative copy.
    copies = 2 * groups
    dn_labels = labels.repeat(copies)
    dn_boxes = boxes.repeat(copies, 1)
    if label_noise_ratio > 0:
        flip = torch.rand(dn_labels.shape, device=device, generator=generator) < label_noise_ratio * 0.5
        random_labels = torch.randint(0, num_classes, dn_labels.shape, device=device, generator=generator)
        dn_labels = torch.where(flip, random_labels, dn_labels)
    if box_noise_scale > 0:
        xyxy = torch.cat([dn_boxes[:, :2] - dn_boxes[:, 2:] / 2, dn_boxes[:, :2] + dn_boxes[:, 2:] / 2], -1)
        half_wh = (dn_boxes[:, 2:] / 2).repeat(1, 2)
        sign = torch.randint(0, 2, dn_boxes.shape, device=device, generator=generator).to(dn_boxes.dtype) * 2 - 1
        magnitude = torch.rand(dn_boxes.shape, device=device, dtype=dn_boxes.dtype, generator=generator)
        is_negative = (torch.arange(copies, device=device) % 2 == 1).repeat_interleave(n)
        magnitude = magnitude + is_negative[:, None].to(dn_boxes.dtype)
        xyxy = (xyxy + magnitude * sign * half_wh * box_noise_scale).clamp(0.0, 1.0)
        dn_boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)

    pad = 2 * max_gt * groups
    hidden = label_enc.weight.shape[1]
    query_label = torch.zeros(batch, pad, hidden, device=device, dtype=label_enc.weight.dtype)
    query_bbox = torch.zeros(batch, pad, 4, device=device, dtype=dn_boxes.dtype)
    within_image = torch.cat([torch.arange(c, device=device) for c in counts])
    slots = (within_image[None, :] + max_gt * torch.arange(copies, device=device)[:, None]).flatten()
    rows = batch_idx.repeat(copies)
    query_label = query_label.index_put((rows, slots), label_enc(dn_labels))
    query_bbox = query_bbox.index_put((rows, slots), inverse_sigmoid(dn_boxes))
    attn_mask = build_dn_attn_mask(max_gt, groups, num_queries, device)
    return query_label, query_bbox, attn_mask, {"pad_size": pad, "num_dn_group": groups}
