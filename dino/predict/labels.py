"""Names of a detector's labels, for ``dino predict``: the checkpoint's own categories, or COCO's for 91-slot models.

A model label is a class index of the classification head, which is the dataset's category id itself (as official;
``dino.data.coco``). Training stores the dataset's categories in the checkpoint metadata
(``"categories"``); checkpoints without them (older files, converted official models) get COCO's 80 names at their
official ids when the model has 91 class slots, and ``"class <label>"`` otherwise. Exported artifacts (ONNX graph,
AOTInductor package, TensorRT engine sidecar) record the class count and the categories as string metadata
(:func:`label_metadata`), so ``dino predict`` names their labels without the checkpoint and can refuse a recipe of
another class count.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from dino import untrusted
from dino.errors import UserError
from dino.untrusted import MAX_CLASSES, Invalid

# The 80 COCO 2017 detection categories at their official ids (1..90, ten ids unused).
COCO_CATEGORY_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork",
    49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
    65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
COCO_NUM_CLASS_SLOTS = 91


class LabelInfo(NamedTuple):
    category_id: int
    name: str


class LabelNames:
    """``names[label] -> LabelInfo(category_id, name)`` for every label a model can emit (unknown ones included)."""

    def __init__(self, table: dict[int, LabelInfo], source: str):
        self._table = table
        self.source = source  # one line for the log: where the names come from

    def __getitem__(self, label: int) -> LabelInfo:
        return self._table.get(int(label), LabelInfo(int(label), f"class {int(label)}"))

    @classmethod
    def build(cls, num_classes: int, categories: list[dict] | None) -> "LabelNames":
        """From the checkpoint's ``categories`` (``[{"id", "name"}]``, any order) or, without them, COCO / numbers."""
        if categories:
            table = {c["id"]: LabelInfo(c["id"], c["name"]) for c in sorted(categories, key=lambda c: c["id"])}
            return cls(table, f"{len(table)} category names from the checkpoint")
        if num_classes == COCO_NUM_CLASS_SLOTS:
            table = {cid: LabelInfo(cid, name) for cid, name in COCO_CATEGORY_NAMES.items()}
            return cls(table, "COCO category names (91-slot model, no categories in the checkpoint)")
        return cls({}, "no category names in the checkpoint: labels shown as 'class <label>'")


# Keys under which exported artifacts record their classes (ONNX metadata_props, AOTInductor package metadata,
# the TensorRT engine's sidecar file): values are strings, as those formats require.
NUM_CLASSES_KEY = "dino.num_classes"
CATEGORIES_KEY = "dino.categories"
LABEL_KEYS = (NUM_CLASSES_KEY, CATEGORIES_KEY)


class ArtifactLabels(NamedTuple):
    """The classes an exported artifact was made for: the head's class count and the dataset's categories (or None)."""

    num_classes: int
    categories: list[dict] | None


def label_metadata(num_classes: int, categories: list[dict] | None) -> dict[str, str]:
    """``{key: string}`` to store in an exported artifact: the class count and, when known, ``[{"id", "name"}]``."""
    meta = {NUM_CLASSES_KEY: str(int(num_classes))}
    if categories:
        meta[CATEGORIES_KEY] = json.dumps([{"id": int(c["id"]), "name": str(c["name"])} for c in categories])
    return meta


def read_label_metadata(meta: Mapping[str, str], source: str) -> ArtifactLabels | None:
    """The labels stored by :func:`label_metadata`, or None when ``meta`` has none (an artifact exported before).

    UserError naming ``source`` and the key when the values are malformed: a class count that is not a whole number
    in 1..MAX_CLASSES, categories that break :func:`dino.untrusted.categories`' rules (size, nesting, types, ids
    below the class count, name length). The values are quoted short.
    """
    if NUM_CLASSES_KEY not in meta:
        return None
    try:
        text = untrusted.text(meta[NUM_CLASSES_KEY], NUM_CLASSES_KEY, 16)
        if not text.isascii() or not text.isdigit():
            raise Invalid(f"{NUM_CLASSES_KEY} is {untrusted.quote(text)}, not a whole number")
        num_classes = untrusted.count(int(text), NUM_CLASSES_KEY, MAX_CLASSES, 1)
        categories = None
        if CATEGORIES_KEY in meta:
            value = untrusted.text(meta[CATEGORIES_KEY], CATEGORIES_KEY, untrusted.MAX_JSON_BYTES)
            categories = untrusted.categories(untrusted.parse_json(value), CATEGORIES_KEY)
            beyond = [c["id"] for c in categories if c["id"] >= num_classes]
            if beyond:
                raise Invalid(f"category id {beyond[0]} is not a label of a {num_classes}-class model")
    except Invalid as err:
        raise UserError(f"{source}: malformed class metadata ({err}); re-export it") from None
    return ArtifactLabels(num_classes, categories)


def engine_sidecar(engine: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``: a TensorRT engine has no room for metadata, so its labels sit
    beside it (``dino export trt`` writes the file)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_engine_sidecar(engine: str | os.PathLike) -> ArtifactLabels | None:
    """The labels in the sidecar of ``engine``, or None when it has none; UserError when it is malformed (larger
    than :data:`~dino.untrusted.MAX_JSON_BYTES`, nested, not an object of strings, or bad labels)."""
    path = engine_sidecar(engine)
    if not path.is_file():
        return None
    try:
        meta = untrusted.read_json(path, "JSON sidecar of a TensorRT engine")
    except UserError as err:
        raise UserError(f"{err}; delete or re-export it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not the JSON sidecar of a TensorRT engine (not an object); delete or re-export it")
    return read_label_metadata(meta, str(path))


def artifact_label_names(recorded: ArtifactLabels | None, num_classes: int, recipe_name: str,
                         categories: list[dict] | None, artifact: str) -> LabelNames:
    """Names of an exported artifact's labels: its own recorded classes (refusing a recipe of another class count),
    else ``categories`` (of the checkpoint it was exported from), else COCO's or numbers by the recipe's class count.

    ``artifact`` names it in messages (its path).
    """
    if recorded is None:
        names = LabelNames.build(num_classes, categories)
        names.source += (f" (by --recipe {recipe_name}: {artifact} records no classes, re-export it to have them "
                         "checked)")
        return names
    if recorded.num_classes != num_classes:
        raise UserError(f"{artifact} was exported for {recorded.num_classes} classes but --recipe {recipe_name} has "
                        f"model.num_classes={num_classes}: give the recipe the model was exported from")
    names = LabelNames.build(recorded.num_classes, recorded.categories or categories)
    if recorded.categories:
        names.source = f"{len(recorded.categories)} category names recorded in {artifact}"
    return names
