"""Official DINO train/val augmentations on ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes``.

A sample is ``(image, target)`` where ``image`` is a PIL image or ``tv_tensors.Image`` (uint8) and ``target`` a dict
with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels, ``canvas_size`` = (h, w)) and ``labels (N,) int64``
(``area``/``iscrowd`` rows too, when present). Because the boxes are tv_tensors, every geometric transform moves them
with the image.

Train (official ``make_coco_transforms('train')``): horizontal flip p=0.5, then with p=0.5 either a multi-scale resize
(shorter side one of ``train_scales``, longer side at most ``train_max_size``) or resize to one of
``crop_resize_scales`` -> random crop of side ``crop_size[0]..crop_size[1]`` -> the same multi-scale resize; then
ImageNet normalisation. Val: shorter side ``val_scale``, longer side at most ``val_max_size``.

Boxes follow the official rule (DINO ``datasets/transforms.py``): the crop clamps boxes to the crop and keeps those
with ``x2 > x1`` and ``y2 > y1`` (:class:`DropEmptyBoxes`, their per-box fields with them); flip and resize never
drop a box, and no minimum size applies (a 0.7 px box stays). A resize multiplies in float32, which can push a
coordinate one rounding step past the new image side, so the boxes are clamped to the image at the end instead of
being dropped.
"""
from __future__ import annotations

from typing import Any, Sequence

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dino.config import DataConfig
from dino.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Target fields with one row per box, dropped together with their box (the official crop's ``fields``).
PER_BOX_FIELDS = ("labels", "area", "iscrowd")

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PER_BOX_FIELDS",
    "DropEmptyBoxes",
    "RandomResize",
    "RandomSizeCrop",
    "build_transforms",
    "resized_size",
]


def _sample_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(h, w) of the image in a flattened sample (falls back to the boxes' canvas)."""
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, PIL.Image.Image)):
            h, w = F.get_size(inpt)
            return int(h), int(w)
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            return tuple(int(s) for s in inpt.canvas_size)  # type: ignore[return-value]
    raise TypeError("sample holds no image (PIL image or tv_tensors.Image) and no BoundingBoxes")


def resized_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) when the shorter side goes to ``size`` and the longer side stays <= ``max_size``.

    Same arithmetic as the official ``get_size_with_aspect_ratio`` so the shorter side is exactly ``size`` when
    the cap does not bite (no float truncation to ``size - 1``).
    """
    short, long = (height, width) if height <= width else (width, height)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


class RandomResize(v2.Transform):
    """Resizes the shorter side to a size drawn uniformly from ``sizes``, longer side capped at ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        sizes = [int(s) for s in ([sizes] if isinstance(sizes, int) else sizes)]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"RandomResize: sizes must be a non-empty list of positive ints, got {sizes}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"RandomResize: max_size must be positive, got {max_size}")
        self.sizes = sizes
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _sample_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": list(resized_size(h, w, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, size=params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crops a random region whose width and height are drawn uniformly from ``[min_size, max_size]``.

    Each side is also capped by the image side (and the lower bound lowered to it), so small images are never an
    error: the official transform fails on images smaller than ``min_size``.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got ({min_size}, {max_size})")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _sample_size(flat_inputs)
        cw = int(torch.randint(min(self.min_size, w), min(self.max_size, w) + 1, ()))
        ch = int(torch.randint(min(self.min_size, h), min(self.max_size, h) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class DropEmptyBoxes(v2.Transform):
    """The official crop's box rule: clamp the boxes to the canvas, keep those with ``x2 > x1`` and ``y2 > y1``.

    Rows of :data:`PER_BOX_FIELDS` in the target dict are dropped with their boxes; other target entries and the
    image pass through. Accepts ``(image, target)``, a ``target`` dict, or a tuple holding one. No minimum size.
    """

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        if isinstance(sample, dict):
            return self._filter(sample)
        if isinstance(sample, (tuple, list)) and any(isinstance(x, dict) for x in sample):
            return type(sample)(self._filter(x) if isinstance(x, dict) else x for x in sample)
        raise TypeError(f"DropEmptyBoxes: expected (image, target dict) or a target dict, got {type(sample).__name__}")

    @staticmethod
    def _filter(target: dict[str, Any]) -> dict[str, Any]:
        boxes = target.get("boxes")
        if not isinstance(boxes, tv_tensors.BoundingBoxes):
            return target
        boxes = F.clamp_bounding_boxes(boxes, clamping_mode="hard")
        xyxy = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        out = dict(target, boxes=tv_tensors.wrap(boxes[keep], like=boxes))
        for name in PER_BOX_FIELDS:
            if name in target:
                if len(target[name]) != len(keep):
                    raise ValueError(f"target[{name!r}] has {len(target[name])} rows for {len(keep)} boxes")
                out[name] = target[name][keep]
        return out


def _to_normalised_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def _positive_ints(value: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _check_scales(data_cfg: DataConfig) -> None:
    """Config errors name the field (``data.<field>``) rather than surfacing from inside a transform."""
    for name in ("train_scales", "crop_resize_scales"):
        value = getattr(data_cfg, name)
        if not isinstance(value, (tuple, list)) or not value or not _positive_ints(value):
            raise UserError(f"data.{name} must be a non-empty list of positive ints, got {value!r}")
    crop = data_cfg.crop_size
    if not isinstance(crop, (tuple, list)) or len(crop) != 2 or not _positive_ints(crop) or crop[0] > crop[1]:
        raise UserError(f"data.crop_size must be (min, max) positive ints with min <= max, got {crop!r}")
    for name in ("train_max_size", "val_scale", "val_max_size"):
        value = getattr(data_cfg, name)
        if name != "val_scale" and value is None:
            continue
        if not _positive_ints([value]):
            raise UserError(f"data.{name} must be a positive int, got {value!r}")
    # Used per batch (collate) and by the DataLoader: refused here, by name, instead of a traceback from inside them.
    if not _positive_ints([data_cfg.size_divisibility]):
        raise UserError(f"data.size_divisibility must be a positive int (1: no rounding up), got "
                        f"{data_cfg.size_divisibility!r}")
    if data_cfg.num_workers < 0:
        raise UserError(f"data.num_workers must be >= 0 (0: load in the main process), got {data_cfg.num_workers}")


def build_transforms(data_cfg: DataConfig, split: str) -> v2.Compose:
    """The official augmentation pipeline for ``split`` ("train" or "val") at the scales in ``data_cfg``.

    Input ``(image, target)`` as described in the module docstring; output ``(image (3,H,W) float32 normalised,
    target)`` with ``target["boxes"]`` still XYXY pixels on the transformed canvas.
    """
    _check_scales(data_cfg)
    if split == "train":
        scales = tuple(data_cfg.train_scales)
        multi_scale = RandomResize(scales, max_size=data_cfg.train_max_size)
        lo, hi = data_cfg.crop_size
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomChoice(
                    [
                        multi_scale,
                        v2.Compose(
                            [
                                RandomResize(tuple(data_cfg.crop_resize_scales)),
                                RandomSizeCrop(lo, hi),
                                DropEmptyBoxes(),
                                RandomResize(scales, max_size=data_cfg.train_max_size),
                            ]
                        ),
                    ]
                ),
                # A resize never drops a box (official); float32 rounding past the side is clamped back.
                v2.ClampBoundingBoxes(clamping_mode="hard"),
                *_to_normalised_float(),
            ]
        )
    if split == "val":
        return v2.Compose(
            [
                v2.ToImage(),
                RandomResize([data_cfg.val_scale], max_size=data_cfg.val_max_size),
                *_to_normalised_float(),
            ]
        )
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
