"""COCO-format detection dataset (an images folder + an ``instances`` json), validated up front.

Behaviour (the official ``CocoDetection`` + ``ConvertCocoPolysToMask``):

- crowd annotations (``iscrowd`` 1) are dropped from the training targets (they stay in the ground truth used by
  COCO evaluation, where pycocotools ignores detections matched to them);
- boxes are clipped to the image; boxes that are degenerate after clipping (negative or zero width or height, or a
  box entirely outside its image: :func:`box_problem` names which) are dropped, counted by kind and logged, and
  left out of the evaluation ground truth too, so training and evaluation see the same boxes;
- images without any remaining box are kept (empty targets), as the official code does.

Labels are the category ids (COCO ids kept, as official): ``num_classes = max category id + 1`` (COCO: 91, ids
1..90 used), so a model, its checkpoint and ``dino predict`` agree on what label 7 is without any mapping table.
:func:`read_categories` gives ``(num_classes, categories)`` of an annotations file without building the dataset.

Bad input raises at construction with a message naming the file and the offending entry: missing or unparseable
json, missing required fields, duplicate ids, an annotation whose ``category_id`` is not in ``categories`` or whose
``image_id`` is not in ``images``, no images at all, and missing image files (all checked up front, the first few
listed). All of these are :class:`~dino.errors.UserError`. An image that cannot be read or decoded when loaded raises
:class:`UnreadableImageError` (or, with ``skip_unreadable``, is replaced by the next readable image, logged and
counted in ``skipped_unreadable``); one whose decoded size differs from the json raises :class:`ImageError`. Both
reach the main process as one line even when raised in a DataLoader worker.

A degenerate box is not bad input to the official code (it clips and drops it): it is dropped here too. Official
evaluation (pycocotools on the raw json) would instead keep it as ground truth that no detection can match: a
zero-size box (area 0) counts as a missed object in every area range and lowers recall; a negative-width or
negative-height box gets a negative area (``w * h`` when ``area`` is absent) and is therefore ignored in every area
range; a box outside its image counts as missed. Here all of them are left out of the ground truth.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino.errors import UserError
from dino.untrusted import MAX_CLASSES, MAX_NAME_CHARS, quote

__all__ = [
    "CocoDetection",
    "ImageError",
    "UnreadableImageError",
    "box_problem",
    "file_name_problem",
    "load_instances_json",
    "read_categories",
]

logger = logging.getLogger("dino.data")
_SKIP_SLOTS = 64
_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id",),
}


class ImageError(UserError):
    """An image file that does not match its annotations (e.g. its decoded size differs from the json).

    A DataLoader worker's exception reaches the main process re-built as ``type(err)(text)``, where ``text`` is
    ``"Caught <type> in DataLoader worker process N.\nOriginal Traceback ... \n<module>.<type>: <message>"``
    (``torch._utils.ExceptionWrapper.reraise``); the constructor keeps only ``<message>``, so the CLI still prints
    one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip("\n").rsplit("\n", 1)[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class UnreadableImageError(ImageError):
    """An image file that cannot be opened or decoded (missing, truncated, not an image)."""


def box_problem(bbox: tuple[float, float, float, float], width: int, height: int) -> str | None:
    """Why a COCO ``[x, y, w, h]`` box (pixels) cannot be a training target in a ``width`` x ``height`` image, or None.

    One of "negative width", "negative height", "zero width", "zero height", "entirely outside the image" (no area
    left once clipped to the image, as the official code clips). Such boxes are dropped.
    """
    x, y, w, h = bbox
    for size, name in ((w, "width"), (h, "height")):
        if size < 0:
            return f"negative {name}"
    for size, name in ((w, "width"), (h, "height")):
        if size == 0:
            return f"zero {name}"
    if min(x + w, width) <= max(x, 0.0) or min(y + h, height) <= max(y, 0.0):
        return "entirely outside the image"
    return None


def load_instances_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a COCO instances json and checks its structure (top-level lists, required fields, unique ids).

    Raises UserError naming the file and the offending entry.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotations file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotations file {path} is not valid JSON: {err}") from None
    except RecursionError:  # json's own guard against a pathological nesting: no COCO file nests that deep
        raise UserError(f"annotations file {path} is not a COCO annotations file: its JSON nests too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"annotations file {path}: expected a JSON object at the top level, got {type(data).__name__}")
    for section, fields in _REQUIRED.items():
        if section not in data:
            raise UserError(f"annotations file {path}: missing required top-level field {section!r}")
        entries = data[section]
        if not isinstance(entries, list):
            raise UserError(f"annotations file {path}: {section!r} must be a list, got {type(entries).__name__}")
        seen: set = set()
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise UserError(f"annotations file {path}: {section}[{i}] must be an object")
            for name in fields:
                if name not in entry:
                    where = f"{section}[{i}]" + (f" (id {entry['id']})" if "id" in entry else "")
                    raise UserError(f"annotations file {path}: {where} is missing required field {name!r}")
            if entry["id"] in seen:
                raise UserError(f"annotations file {path}: duplicate id {entry['id']!r} in {section!r}")
            seen.add(entry["id"])
    if not data["images"]:
        raise UserError(f"annotations file {path}: 'images' is empty; a dataset needs at least one image")
    for i, img in enumerate(data["images"]):
        for name in ("id", "width", "height"):
            value = img[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "id" else 1):
                raise UserError(
                    f"annotations file {path}: images[{i}] has {name} {value!r}; expected an int"
                    + (" >= 0" if name == "id" else " >= 1")
                )
    return data


def categories_of(data: dict[str, Any], path: str | os.PathLike) -> tuple[int, list[dict[str, Any]]]:
    """``(num_classes, [{"id", "name"}, ...] sorted by id)`` of a loaded instances json (``path`` for messages).

    ``num_classes = max category id + 1``: labels are the category ids. A category without a name gets
    ``"class <id>"``.
    """
    categories = []
    for i, cat in enumerate(data["categories"]):
        cid = cat["id"]
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
            raise UserError(f"annotations file {path}: categories[{i}] has id {cid!r}; expected an int >= 0")
        if cid >= MAX_CLASSES:
            raise UserError(f"annotations file {path}: categories[{i}] has id {cid}; labels are category ids, so the "
                            f"model would need {cid + 1:,} class outputs (at most {MAX_CLASSES:,}): renumber the ids")
        name = str(cat.get("name", f"class {cid}"))
        if len(name) > MAX_NAME_CHARS:
            raise UserError(f"annotations file {path}: categories[{i}] (id {cid}) has a name of {len(name):,} "
                            f"characters ({quote(name)}); class names hold at most {MAX_NAME_CHARS}")
        categories.append({"id": cid, "name": name})
    if not categories:
        raise UserError(f"annotations file {path}: 'categories' is empty; a dataset needs at least one category")
    categories.sort(key=lambda c: c["id"])
    return categories[-1]["id"] + 1, categories


def read_categories(annotations_file: str | os.PathLike) -> tuple[int, list[dict[str, Any]]]:
    """``(num_classes, categories)`` of a COCO instances json: ``max category id + 1`` (COCO ids kept as labels; COCO
    gives 91) and ``[{"id": 1, "name": "person"}, ...]`` sorted by id, the checkpoint's ``"categories"`` metadata.

    Raises UserError naming the file when it is missing, not valid JSON, malformed, or has no categories.
    """
    return categories_of(load_instances_json(annotations_file), annotations_file)


def file_name_problem(file_name: str) -> str | None:
    """Why an image's ``file_name`` does not name a file inside its images folder, or None: an absolute path (POSIX
    or Windows), a ``..`` that climbs out of the folder, or a NUL character. Such a file is never opened."""
    if "\0" in file_name:
        return "holds a NUL character"
    if os.path.isabs(file_name) or PureWindowsPath(file_name).drive or PureWindowsPath(file_name).root:
        return "is an absolute path"
    if ".." in PurePosixPath(file_name.replace("\\", "/")).parts:
        return "climbs out of the images folder (..)"
    return None


def annotation_problem(ann: dict[str, Any], image_ids, category_ids) -> tuple[str, str] | None:
    """``(kind, "has ...")`` when annotation ``ann`` cannot be used at all, else None: its ``category_id`` is not in
    ``category_ids``, its ``image_id`` is not in ``image_ids``, or its ``bbox`` is not 4 finite numbers."""
    cid, iid, bbox = ann["category_id"], ann["image_id"], ann["bbox"]
    if cid not in category_ids:
        shown = sorted(category_ids)[:20]
        return "unknown category_id", f"has category_id {cid!r}, which is not in 'categories' (ids {shown})"
    if iid not in image_ids:
        return "unknown image_id", f"references image_id {iid!r}, which is not in 'images'"
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        return "bad bbox", f"has bbox {bbox!r}; expected 4 finite numbers [x, y, w, h]"
    return None


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
    ``dropped_boxes`` (annotations dropped as degenerate after clipping to the image; also left out of ``coco``),
    ``dropped`` (their ids by :func:`box_problem` kind).
    skip_unreadable: an image that cannot be read gives the next readable image's sample instead (the sample's
        augmentation randomness is unchanged: nothing is drawn before the image is read), logged as a warning and
        counted in ``skipped_unreadable`` (over all DataLoader workers); False: raise :class:`UnreadableImageError`.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations_file: str | os.PathLike,
        transforms: Callable | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations_file)
        self.transforms = transforms if transforms is not None else _default_transforms()
        self.skip_unreadable = skip_unreadable
        # Skips counted in shared memory, one slot per DataLoader worker (and one for the main process), so that the
        # main process sees what its workers skipped without a lock.
        self._skips = torch.zeros(_SKIP_SLOTS, dtype=torch.int64).share_memory_() if skip_unreadable else None
        data = load_instances_json(self.annotations_file)
        self.num_classes, self.categories = categories_of(data, self.annotations_file)
        self.label_to_category_id = {c["id"]: c["id"] for c in self.categories}
        self._images = [
            {"id": img["id"], "file_name": str(img["file_name"]), "height": img["height"], "width": img["width"]}
            for img in data["images"]
        ]
        self.image_ids = [img["id"] for img in self._images]
        self._boxes, self._labels, self.dropped = self._index_annotations(data)
        self.dropped_boxes = sum(len(ids) for ids in self.dropped.values())
        if self.dropped_boxes:
            kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(self.dropped.items()))
            ids = sorted(i for ids in self.dropped.values() for i in ids)
            shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
            logger.warning(
                "%s: dropped %d box(es) from training and from the evaluation ground truth (%s; annotation ids %s)",
                self.annotations_file, self.dropped_boxes, kinds, shown,
            )
        self._check_image_files()
        self._coco = None

    def _index_annotations(self, data: dict) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, list]]:
        """Per image: clipped non-crowd xyxy boxes (N, 4) float32 and labels (N,) int64; the ids dropped by kind."""
        row = {img["id"]: i for i, img in enumerate(self._images)}
        boxes: list[list] = [[] for _ in self._images]
        labels: list[list] = [[] for _ in self._images]
        dropped: dict[str, list] = {}
        for ann in data["annotations"]:
            problem = annotation_problem(ann, row, self.label_to_category_id)
            if problem is not None:
                raise UserError(f"annotations file {self.annotations_file}: annotation id {ann['id']} {problem[1]}")
            cid = ann["category_id"]
            image = self._images[row[ann["image_id"]]]
            if ann.get("iscrowd", 0):
                continue  # kept for evaluation (pycocotools ignores detections matched to crowds), not a target
            x, y, w, h = (float(v) for v in ann["bbox"])
            W, H = image["width"], image["height"]
            kind = box_problem((x, y, w, h), W, H)
            if kind is not None:
                dropped.setdefault(kind, []).append(ann["id"])  # official: clipped, then dropped as empty
                continue
            boxes[row[ann["image_id"]]].append((max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)))
            labels[row[ann["image_id"]]].append(cid)
        return (
            [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes],
            [np.asarray(lab, dtype=np.int64) for lab in labels],
            dropped,
        )

    def _check_image_files(self) -> None:
        outside = [(img["file_name"], problem) for img in self._images
                   if (problem := file_name_problem(img["file_name"])) is not None]
        if outside:
            shown = ", ".join(f"{quote(name)} {problem}" for name, problem in outside[:3])
            raise UserError(f"{len(outside)} image file_name(s) of {self.annotations_file} do not name a file inside "
                            f"the images folder {self.images_dir}: {shown}" + (", ..." if len(outside) > 3 else "")
                            + "; give paths relative to the images folder (dino data check lists them all)")
        if not self.images_dir.is_dir():
            raise UserError(f"images folder {self.images_dir} (for {self.annotations_file}) does not exist")
        missing = [img["file_name"] for img in self._images if not (self.images_dir / img["file_name"]).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise UserError(
                f"{len(missing)} of {len(self._images)} images listed in {self.annotations_file} are missing from "
                f"{self.images_dir}: {shown}"
            )

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, index: int) -> PIL.Image.Image:
        """The RGB image at ``index``, checked against the json's width and height.

        Raises :class:`UnreadableImageError` when the file cannot be opened or decoded, :class:`ImageError` when its
        size differs from the json; both name the file.
        """
        info = self._images[index]
        path = self.images_dir / info["file_name"]
        try:
            with PIL.Image.open(path) as file:
                image = file.convert("RGB")
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
            # PIL reports a truncated or corrupt file as OSError (UnidentifiedImageError when it is no image at
            # all), some broken chunks as SyntaxError or ValueError.
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UnreadableImageError(f"cannot read image {path} (image id {info['id']}): {reason}") from None
        if image.size != (info["width"], info["height"]):
            raise ImageError(
                f"image {path} (image id {info['id']}) is {image.size[0]}x{image.size[1]} but "
                f"{self.annotations_file} says {info['width']}x{info['height']}"
            )
        return image

    def image_info(self, index: int) -> dict[str, Any]:
        """``{"id", "file_name", "height", "width"}`` of the image at ``index``, as the json lists it."""
        return dict(self._images[index])

    def raw_target(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes (N, 4) xyxy pixels of the original image, labels (N,))`` after cleaning, before transforms."""
        return self._boxes[index], self._labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        for offset in range(len(self)):
            at = (index + offset) % len(self)
            try:
                image = self.load_image(at)
                break
            except UnreadableImageError as err:
                if not self.skip_unreadable:
                    raise
                logger.warning("skipped (data.skip_unreadable): %s", err)
                worker = torch.utils.data.get_worker_info()
                self._skips[(worker.id if worker is not None else -1) % _SKIP_SLOTS] += 1
        else:
            raise UnreadableImageError(f"none of the {len(self)} images of {self.annotations_file} can be read")
        return self._sample(at, image)

    @property
    def skipped_unreadable(self) -> int:
        """Unreadable images skipped so far (``skip_unreadable``), by this process and its DataLoader workers."""
        return 0 if self._skips is None else int(self._skips.sum())

    def _sample(self, index: int, image: PIL.Image.Image) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self._images[index]
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
        """pycocotools ``COCO`` ground truth (built lazily from the json; missing ``area``/``iscrowd`` filled in),
        without the boxes dropped from training (``dropped``)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            data = load_instances_json(self.annotations_file)
            dropped = {i for ids in self.dropped.values() for i in ids}
            data["annotations"] = [ann for ann in data["annotations"] if ann["id"] not in dropped]
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
