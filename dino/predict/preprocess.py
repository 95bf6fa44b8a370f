"""``dino eval``'s pre-processing of images for :mod:`dino.predict`: each image resized by the recipe's validation
transform (``dino.data.build_transforms(data, "val")``: shorter side ``data.val_scale``, longer side at most
``data.val_max_size``, ImageNet normalisation), padded at the bottom/right with the padding mask True on padding
(``dino.data.pad_images``).

A fixed-size graph gets the batch padded to its size; an image whose evaluation size does not fit it is resized to
fit instead (keeping its aspect ratio), which is the only case where a graph sees other pixels than eval.
"""
from __future__ import annotations

import dataclasses

import PIL.Image
import torch
from torch import nn

from dino.config import DataConfig
from dino.data import build_transforms, pad_images
from dino.data.transforms import resized_size
from dino.errors import UserError


class Preprocessor:
    """PIL images -> ``(images (B,3,H,W), mask (B,H,W), resized sizes [(h, w)])`` exactly as ``dino eval`` batches them.

    With ``input_size`` (a fixed-size graph) the batch is padded to that size, and an image whose evaluation size does
    not fit is resized to fit it (shorter/longer side limits lowered to the graph's sides).
    """

    def __init__(self, data_cfg: DataConfig, input_size: tuple[int, int] | None = None):
        self.data_cfg = data_cfg
        self.input_size = input_size
        self._transforms: dict[tuple[int, int], object] = {}

    def _limits(self, height: int, width: int) -> tuple[int, int]:
        """(shorter side, longer-side cap) in pixels of the resize of a ``height`` x ``width`` image."""
        cfg = self.data_cfg
        if self.input_size is None:
            return cfg.val_scale, cfg.val_max_size
        out_h, out_w = resized_size(height, width, cfg.val_scale, cfg.val_max_size)
        max_h, max_w = self.input_size
        if out_h <= max_h and out_w <= max_w:
            return cfg.val_scale, cfg.val_max_size
        short_limit, long_limit = (max_h, max_w) if height <= width else (max_w, max_h)
        return min(cfg.val_scale, short_limit), min(cfg.val_max_size, long_limit)

    def transform(self, picture: PIL.Image.Image) -> torch.Tensor:
        """One image resized and normalised, ``(3, h, w)`` float32; UserError when a side would be under 1 pixel."""
        limits = self._limits(picture.height, picture.width)
        out_h, out_w = resized_size(picture.height, picture.width, *limits)
        if min(out_h, out_w) < 1:
            raise UserError(f"{picture.width}x{picture.height} px is too elongated for the model: resizing its longer "
                            f"side to at most {limits[1]} px leaves the shorter one under 1 px")
        if limits not in self._transforms:
            scale, max_size = limits
            self._transforms[limits] = build_transforms(
                dataclasses.replace(self.data_cfg, val_scale=scale, val_max_size=max_size), "val")
        return self._transforms[limits](picture).as_subclass(torch.Tensor)

    def batch(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Resized images -> ``images (B,3,H,W)``, ``mask (B,H,W)`` True on padding (to the graph's size if fixed)."""
        images, mask = pad_images(tensors, self.data_cfg.size_divisibility)
        if self.input_size is not None:
            height, width = self.input_size
            pad = (0, width - images.shape[-1], 0, height - images.shape[-2])
            if min(pad) < 0:  # size_divisibility rounded past the graph's size
                raise UserError(f"images padded to {tuple(images.shape[-2:])} exceed the graph input {self.input_size}; "
                                "set data.size_divisibility=1")
            images = nn.functional.pad(images, pad)
            mask = nn.functional.pad(mask, pad, value=True)
        return images, mask

    def __call__(self, pictures: list[PIL.Image.Image]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        tensors = [self.transform(p) for p in pictures]
        images, mask = self.batch(tensors)
        return images, mask, [tuple(t.shape[-2:]) for t in tensors]
