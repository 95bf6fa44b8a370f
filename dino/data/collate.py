"""Batching: pad images to the batch maximum and build the padding mask (the model's input contract)."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

__all__ = ["Batch", "collate_fn", "pad_images"]


class Batch(NamedTuple):
    """A padded batch (unpacks as ``images, mask, targets``).

    ``images (B, 3, H, W)`` float, zero-padded; ``mask (B, H, W)`` bool, True on padding; ``targets`` list of B dicts.
    """

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, Any]]


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads ``(3, h_i, w_i)`` images at the bottom/right with zeros to a common size.

    The common size is the batch maximum rounded up to a multiple of ``size_divisibility``.
    Returns ``images (B, 3, H, W)`` and ``mask (B, H, W)`` bool, True on padding.
    """
    if not images:
        raise ValueError("pad_images: empty batch")
    if size_divisibility < 1:
        raise ValueError(f"pad_images: size_divisibility must be >= 1, got {size_divisibility}")
    if any(img.dim() != 3 for img in images):
        raise ValueError(f"pad_images: expected (C, H, W) images, got shapes {[tuple(i.shape) for i in images]}")
    channels = {img.shape[0] for img in images}
    if len(channels) != 1:
        raise ValueError(f"pad_images: images have different channel counts {sorted(channels)}")
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    h = -(-h // size_divisibility) * size_divisibility
    w = -(-w // size_divisibility) * size_divisibility
    out = images[0].new_zeros((len(images), channels.pop(), h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return out, mask


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisibility: int = 1) -> Batch:
    """DataLoader ``collate_fn`` for ``(image, target)`` samples; returns a :class:`Batch` (unpackable as a tuple).

    For a multiple other than 1 use ``functools.partial(collate_fn, size_divisibility=32)``.
    """
    images, targets = zip(*batch) if batch else ((), ())
    padded, mask = pad_images(list(images), size_divisibility)
    return Batch(padded, mask, list(targets))
