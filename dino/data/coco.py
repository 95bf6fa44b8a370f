"""COCO-format detection dataset (an images folder + an ``instances`` json), validated up front.

Behaviour (the official ``CocoDetection`` + ``ConvertCocoPolysToMask``):

- crowd annotations (``iscrowd`` 1) are dropped from the training targets (they stay in the ground truth used by
  COCO evaluation, where pycocotools ignores detections matched to them);
- boxes are clipped to the image; boxes that are degenerate after clipping (width or height <= 0, e.g. a box
  entirely outside its image) are dropped, counted and logged;
- images without any remaining box are kept (empty targets), as the official code does.

Labels are the category ids (COCO ids kept, as official): ``num_classes = max category id + 1`` (COCO: 91, ids
1..90 used), so a model, its checkpoint and ``dino predict`` agree on what label 7 is without any mapping table.
:func:`read_categories` gives ``(num_classes, categories)`` of an annotations file without building the dataset.

Bad input raises at construction with a message naming the file and the offending entry: missing or unparseable
json, missing required fields, duplicate ids, an annotation whose ``category_id`` is not in ``categories`` or whose
``image_id`` is not in ``images``, no images at all, and missing image files (all checked up front, the first few
listed). An image whose decoded size differs from the json raises when loaded. A box entirely outside its image is
not bad input to the official code (it clips and drops it): it is dropped here too, and the drops are counted in
``dropped_boxes`` and logged.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino.errors import UserError

__all__ = ["CocoDetection", "load_instances_json", "read_categories"]

logger = logging.getLogger("dino.data")
_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id",),
}


def load_instances_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a COCO instances json and checks its structure (top-level lists, required fields, unique ids)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"annotations file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"annotations file {path}: expected a JSON object at the top level, got {type(data).__name__}")
    for section, fields in _REQUIRED.items():
        if section not in data:
            raise ValueError(f"annotations file {path}: missing required top-level field {section!r}")
        entries = data[section]
        if not isinstance(entries, list):
            raise ValueError(f"annotations file {path}: {section!r} must be a list, got {type(entries).__name__}")
        seen: set = set()
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"annotations file {path}: {section}[{i}] must be an object")
            for name in fields:
                if name not in entry:
                    where = f"{section}[{i}]" + (f" (id {entry['id']})" if "id" in entry else "")
                    raise ValueError(f"annotations file {path}: {where} is missing required field {name!r}")
            if entry["id"] in seen:
                raise ValueError(f"annotations file {path}: duplicate id {entry['id']!r} in {section!r}")
            seen.add(entry["id"])
    if not data["images"]:
        raise ValueError(f"annotations file {path}: 'images' is empty; a dataset needs at least one image")
    for i, img in enumerate(data["images"]):
        for name in ("id", "width", "height"):
            value = img[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "id" else 1):
                raise ValueError(
                    f"annotations file {path}: images[{i}] has {name} {value!r}; expected an int"
                    + (" >= 0" if name == "id" else " >= 1")
                )
    return data


def _categories_of(data: dict[str, Any], path: str | os.PathLike) -> tuple[int, list[dict[str, Any]]]:
    """``(num_classes, [{"id", "name"}, ...] sorted by id)`` of a loaded instances json (``path`` for messages).

    ``num_classes = max category id + 1``: labels are the category ids. A category without a name gets
    ``"class <id>"``.
    """
    categories = []
    for i, cat in enumerate(data["categories"]):
        cid = cat["id"]
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
            raise UserError(f"annotations file {path}: categories[{i}] has id {cid!r}; expected an int >= 0")
        categories.append({"id": cid, "name": str(cat.get("name", f"class {cid}"))})
    if not categories:
        raise UserError(f"annotations file {path}: 'categories' is empty; a dataset needs at least one category")
    categories.sort(key=lambda c: c["id"])
    return categories[-1]["id"] + 1, categories


def read_categories(annotations_file: str | os.PathLike) -> tuple[int, list[dict[str, Any]]]:
    """``(num_classes, categories)`` of a COCO instances json: ``max category id + 1`` (COCO ids kept as labels; COCO
    gives 91) and ``[{"id": 1, "name": "person"}, ...]`` sorted by id, the checkpoint's ``"categories"`` metadata.

    Raises UserError naming the file when it is missing, not valid JSON, malformed, or has no categories.
    """
    return _categories_of(load_instances_json(annotations_file), annotations_file)


def _default_transforms() -> v2.Compose:
    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    )


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format dataset yielding ``(image, target)`` in the model's input contract.

    ``image``: ``(3, H, W)`` float32, ImageNet-normalised, after ``transforms``.
    ``target``: ``labels (N,) int64``; ``boxes (N, 4) float32`` cxcywh normalised by the transformed image size
    (in [0, 1]); ``image_id`` int; ``orig_size (2,) int64`` (h, w) of the file; ``size (2,) int64`` (h, w) after
    transforms.

    Args:
        images_dir: folder the ``file_name`` entries are relative to.
        annotations_file: COCO instances json.
        transforms: a v2 pipeline on ``(image, {"boxes": BoundingBoxes XYXY, "labels"})`` that ends with a normalised
            float image (``dino.data.transforms.build_transforms``); None: only convert and normalise.
    Attributes: ``num_classes`` (max category id + 1), ``categories`` (``[{"id", "name"}]`` by id),
    ``label_to_category_id`` (the labels that are categories: ``{id: id}``; other labels are not evaluated),
    ``dropped_boxes`` (annotations dropped as degenerate after clipping to the image).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations_file: str | os.PathLike,
        transforms: Callable | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations_file)
        self.transforms = transforms if transforms is not None else _default_transforms()
        data = load_instances_json(self.annotations_file)
        self.num_classes, self.categories = _categories_of(data, self.annotations_file)
        self.label_to_category_id = {c["id"]: c["id"] for c in self.categories}
        self._images = [
            {"id": img["id"], "file_name": str(img["file_name"]), "height": img["height"], "width": img["width"]}
            for img in data["images"]
        ]
        self.image_ids = [img["id"] for img in self._images]
        self._boxes, self._labels, self.dropped_boxes = self._index_annotations(data)
        if self.dropped_boxes:
            logger.warning(
                "%s: dropped %d box(es) of zero size or entirely outside their image (as the official code does)",
                self.annotations_file, self.dropped_boxes,
            )
        self._check_image_files()
        self._coco = None

    def _index_annotations(self, data: dict) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Per image: clipped non-crowd xyxy boxes (N, 4) float32 and labels (N,) int64; the number dropped."""
        path = self.annotations_file
        row = {img["id"]: i for i, img in enumerate(self._images)}
        boxes: list[list] = [[] for _ in self._images]
        labels: list[list] = [[] for _ in self._images]
        dropped = 0
        for ann in data["annotations"]:
            aid, iid, cid = ann["id"], ann["image_id"], ann["category_id"]
            if cid not in self.label_to_category_id:
                raise ValueError(
                    f"annotations file {path}: annotation id {aid} has category_id {cid!r}, which is not in "
                    f"'categories' (ids {sorted(self.label_to_category_id)[:20]})"
                )
            if iid not in row:
                raise ValueError(
                    f"annotations file {path}: annotation id {aid} references image_id {iid!r}, "
                    "which is not in 'images'"
                )
            bbox = ann["bbox"]
            if (
                not isinstance(bbox, (list, tuple))
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
            ):
                raise ValueError(
                    f"annotations file {path}: annotation id {aid} has bbox {bbox!r}; "
                    "expected 4 finite numbers [x, y, w, h]"
                )
            image = self._images[row[iid]]
            if ann.get("iscrowd", 0):
                continue  # kept for evaluation (pycocotools ignores detections matched to crowds), not a target
            x, y, w, h = (float(v) for v in bbox)
            W, H = image["width"], image["height"]
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if x2 <= x1 or y2 <= y1:
                dropped += 1  # zero size, or entirely outside the image: official clips then drops it
                continue
            boxes[row[iid]].append((x1, y1, x2, y2))
            labels[row[iid]].append(cid)
        return (
            [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes],
            [np.asarray(lab, dtype=np.int64) for lab in labels],
            dropped,
        )

    def _check_image_files(self) -> None:
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"images folder {self.images_dir} (for {self.annotations_file}) does not exist")
        missing = [img["file_name"] for img in self._images if not (self.images_dir / img["file_name"]).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of {len(self._images)} images listed in {self.annotations_file} are missing from "
                f"{self.images_dir}: {shown}"
            )

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, index: int) -> PIL.Image.Image:
        """The RGB image at ``index``, checked against the json's width and height."""
        info = self._images[index]
        path = self.images_dir / info["file_name"]
        try:
            image = PIL.Image.open(path).convert("RGB")
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {path} (image id {info['id']}): {err}") from None
        if image.size != (info["width"], info["height"]):
            raise ValueError(
                f"image {path} (image id {info['id']}) is {image.size[0]}x{image.size[1]} but "
                f"{self.annotations_file} says {info['width']}x{info['height']}"
            )
        return image

    def raw_target(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes (N, 4) xyxy pixels of the original image, labels (N,))`` after cleaning, before transforms."""
        return self._boxes[index], self._labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self._images[index]
        image = self.load_image(index)
        orig_h, orig_w = info["height"], info["width"]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(self._boxes[index].copy()), format="XYXY", canvas_size=(orig_h, orig_w)
            ),
            "labels": torch.from_numpy(self._labels[index].copy()),
        }
        image, target = self.transforms(image, target)
        image = image.as_subclass(torch.Tensor)
        h, w = image.shape[-2:]
        boxes = box_convert(target["boxes"].as_subclass(torch.Tensor).float(), "xyxy", "cxcywh")
        boxes = (boxes / torch.tensor([w, h, w, h], dtype=torch.float32)).clamp_(0.0, 1.0)
        return image, {
            "labels": target["labels"].as_subclass(torch.Tensor).long(),
            "boxes": boxes,
            "image_id": int(info["id"]),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }

    @property
    def coco(self):
        """pycocotools ``COCO`` ground truth (built lazily from the json; missing ``area``/``iscrowd`` filled in)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            data = load_instances_json(self.annotations_file)
            for ann in data["annotations"]:
                ann.setdefault("iscrowd", 0)
                if "area" not in ann:
                    ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            data.setdefault("info", {})
            coco = COCO()
            coco.dataset = data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __repr__(self) -> str:
        return (
            f"CocoDetection({len(self)} images, {self.num_classes} classes (max category id + 1), "
            f"images_dir={str(self.images_dir)!r}, annotations_file={str(self.annotations_file)!r})"
        )
