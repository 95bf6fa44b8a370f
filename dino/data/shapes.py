"""The built-in synthetic "shapes" detection dataset, written in COCO format.

Each image shows 1-4 saturated rectangles, ellipses and triangles (categories 1, 2, 3) on a desaturated textured
background (smooth noise, a gradient or stripes), so the classes are told apart by shape, not colour, and objects
always stand out from the background. Objects span 15-50% of the image side and may overlap a little (at most 25% of
the smaller box), later shapes drawn over earlier ones; the boxes are the full (unoccluded) extents.

Layout under ``root``::

    train/000000.png ...   val/000000.png ...
    annotations/train.json  annotations/val.json
    .shapes_stamp.json      (the generation parameters and the list of files made; a matching stamp makes
                            generation a no-op)

Generation is deterministic (numpy ``default_rng`` seeded from ``(seed, split, index)``) and atomic: everything is
written into a temporary sibling folder that is renamed to ``root`` at the end, so concurrent callers (one per
process) never see a half-written dataset. Other parameters regenerate ``root`` only when it holds nothing but what
the generator made (the stamp's list); a folder holding anything else (a user's file, another dataset) is refused
with one line and left as it is.
"""
from __future__ import annotations

import colorsys
import json
import os
import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock  # inter-process lock; a dependency of torch
import numpy as np
from PIL import Image, ImageDraw

from dino.errors import UserError
from dino.run_lock import first_process, run_lock

__all__ = ["CATEGORIES", "generate_shapes_dataset", "render_shapes_image"]

logger = logging.getLogger("dino.data")

CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
_STAMP = ".shapes_stamp.json"
# Bump when the rendering changes so existing folders are regenerated.
_VERSION = 1
_MAX_OVERLAP = 0.25  # intersection / area of the smaller box
_SPLITS = {"train": 0, "val": 1}
# The parameters of generate_shapes_dataset, by the recipe fields that set them (dino.config.DataConfig).
_FIELDS = {"num_train": "data.shapes_train_images", "num_val": "data.shapes_val_images",
           "image_size": "data.shapes_image_size", "seed": "data.shapes_seed",
           "val_image_size": "data.shapes_val_image_size"}


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float32 in [0, 255], low saturation so saturated objects stand out."""
    base = rng.uniform(50, 200, size=3)
    base = base.mean() + 0.25 * (base - base.mean())  # desaturate
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: upsampled low-resolution noise
        cells = int(rng.integers(4, 17))
        low = rng.normal(0, 30, size=(cells, cells)).astype(np.float32)
        tex = np.asarray(Image.fromarray(low, mode="F").resize((width, height), Image.BICUBIC))
    else:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        yy, xx = yy / height, xx / width
        angle = rng.uniform(0, np.pi)
        proj = np.cos(angle) * xx + np.sin(angle) * yy
        if kind == 1:  # linear gradient
            tex = (proj - proj.mean()) * rng.uniform(40, 100)
        else:  # stripes
            tex = np.sin(2 * np.pi * proj * rng.uniform(3, 10)) * rng.uniform(10, 30)
    img = base[None, None, :] + tex[..., None] * rng.uniform(0.8, 1.2, size=3)
    return np.clip(img, 0, 255)


def _object_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _side_range(side: int) -> tuple[int, int]:
    """(min, max) extent in pixels of an object along an image side of ``side`` pixels: 15-50% of it."""
    return max(4, round(0.15 * side)), max(5, round(0.5 * side))


def _place_boxes(rng: np.random.Generator, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """1-4 integer boxes (x0, y0, x1, y1), x1/y1 exclusive, inside the image, overlapping at most _MAX_OVERLAP."""
    wanted = int(rng.integers(1, 5))
    (lo_w, hi_w), (lo_h, hi_h) = _side_range(width), _side_range(height)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(wanted * 20):
        if len(boxes) == wanted:
            break
        w, h = int(rng.integers(lo_w, hi_w + 1)), int(rng.integers(lo_h, hi_h + 1))
        if max(w, h) > 2.5 * min(w, h):  # keep aspect ratios where shapes stay recognisable
            continue
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if all(_overlap(box, other) <= _MAX_OVERLAP for other in boxes):
            boxes.append(box)
    return boxes


def _triangle(rng: np.random.Generator, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """A triangle whose tight bounding box is ``box``: a base on one side, the apex on the opposite side."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    t = rng.uniform(0.2, 0.8)
    side = int(rng.integers(4))
    if side == 0:  # apex up
        return [(x0 + t * (x1 - x0), y0), (x0, y1), (x1, y1)]
    if side == 1:  # apex down
        return [(x0 + t * (x1 - x0), y1), (x0, y0), (x1, y0)]
    if side == 2:  # apex left
        return [(x0, y0 + t * (y1 - y0)), (x1, y0), (x1, y1)]
    return [(x1, y0 + t * (y1 - y0)), (x0, y0), (x0, y1)]


def render_shapes_image(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[Image.Image, list[dict]]:
    """Draws one ``size`` (pixels; an int: a square, a pair: (height, width)) image; returns it and its objects as
    ``{"category_id", "bbox": [x, y, w, h]}`` (pixels). A square draws the same numbers as (size, size)."""
    height, width = (size, size) if isinstance(size, int) else size
    canvas = Image.fromarray(_background(rng, height, width).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    objects = []
    for box in _place_boxes(rng, height, width):
        category_id = int(rng.integers(1, 4))
        colour = _object_colour(rng)
        corners = [box[0], box[1], box[2] - 1, box[3] - 1]  # PIL's rectangle/ellipse bounds are inclusive
        if category_id == 1:
            draw.rectangle(corners, fill=colour)
        elif category_id == 2:
            draw.ellipse(corners, fill=colour)
        else:
            draw.polygon(_triangle(rng, box), fill=colour)
        objects.append(
            {"category_id": category_id, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
        )
    # Mild sensor noise over everything so flat colours are not a shortcut.
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 4, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"), objects


def _write_split(folder: Path, split: str, count: int, size: tuple[int, int], seed: int) -> None:
    """``count`` images of ``size`` (height, width) pixels and their annotations json."""
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLITS[split], index])
        image, objects = render_shapes_image(rng, size)
        file_name = f"{index:06d}.png"
        image.save(folder / split / file_name, format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size[1], "height": size[0]})
        for obj in objects:
            w, h = obj["bbox"][2], obj["bbox"][3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "bbox": obj["bbox"],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": f"dino synthetic shapes, {split}", "version": str(_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    (folder / "annotations").mkdir(exist_ok=True)
    with open(folder / "annotations" / f"{split}.json", "w") as f:
        json.dump(data, f)


def _read_stamp(root: Path) -> dict | None:
    try:
        with open(root / _STAMP) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _settings(stamp: dict | None) -> dict | None:
    """The generation parameters of a stamp (without its file list)."""
    return None if stamp is None else {k: v for k, v in stamp.items() if k != "files"}


def _made_files(stamp: dict) -> set[str]:
    """The files (relative, "/"-separated) the generator wrote for ``stamp``; derived from the parameters for stamps
    written before the list was recorded (the names follow from them)."""
    if isinstance(stamp.get("files"), list):
        return set(stamp["files"])
    made = {f"annotations/{split}.json" for split in _SPLITS}
    for split, count in (("train", stamp.get("num_train", 0)), ("val", stamp.get("num_val", 0))):
        made.update(f"{split}/{index:06d}.png" for index in range(int(count)))
    return made


def _foreign(root: Path, stamp: dict) -> list[str]:
    """What under ``root`` the generator did not make (relative paths, sorted)."""
    made = _made_files(stamp) | {_STAMP}
    folders = {str(Path(m).parent.as_posix()) for m in made} - {"."}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in dirnames:
            if (rel / name).as_posix() not in folders:
                found.append((rel / name).as_posix() + "/")
        dirnames[:] = [d for d in dirnames if (rel / d).as_posix() in folders]
        found.extend((rel / name).as_posix() for name in filenames if (rel / name).as_posix() not in made)
    return sorted(found)


def _check_replaceable(root: Path) -> None:
    """UserError unless ``root`` is absent, empty, or holds only what the generator made (it is about to go)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"data.root {root} is a file, not a folder; choose another data.root")
    stamp = _read_stamp(root)
    if stamp is None:
        if any(root.iterdir()):
            raise UserError(
                f"data.root {root} is not empty and is not a shapes dataset (no {_STAMP}); the shapes generator "
                "writes only into an empty folder or one it made: choose another data.root (or data.dataset='coco' "
                "for a COCO-format dataset)"
            )
        return
    foreign = _foreign(root, stamp)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"data.root {root} holds {len(foreign)} file(s) the shapes generator did not make ({shown}); new "
            "data.shapes_* settings would regenerate the folder, so it is left as it is: move them out, or choose "
            "another data.root for the new settings"
        )


def _generate(root: Path, params: dict) -> None:
    """Writes the dataset into a temporary sibling folder and renames it to ``root`` (which holds only files the
    generator made, :func:`_check_replaceable`)."""
    _check_replaceable(root)
    size = params["image_size"]
    val_size = "x".join(map(str, params.get("val_image_size", (size, size))))
    # One line, so that a data.root meant to hold a dataset already does not fill up unnoticed; a warning, so that
    # the Python API says it too (logging's last-resort handler prints warnings when nothing is configured).
    logger.warning("generating the synthetic shapes dataset (%d train images of %dx%d px, %d val images of %s px, "
                   "seed %d) into %s", params["num_train"], size, size, params["num_val"], val_size, params["seed"],
                   root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not secret
    try:
        square = (params["image_size"], params["image_size"])
        val_size = tuple(params.get("val_image_size", square))
        for split, count, size in (("train", params["num_train"], square), ("val", params["num_val"], val_size)):
            _write_split(tmp, split, count, size, params["seed"])
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        with open(tmp / _STAMP, "w") as f:
            json.dump({**params, "files": files}, f)
        if root.exists():
            # Move the old folder aside first so `root` is never a mix of two generations.
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_shapes_dataset(
    root: str | os.PathLike, num_train: int, num_val: int, image_size: int, seed: int = 0,
    val_image_size: tuple[int, int] | None = None,
) -> Path:
    """Generates the shapes dataset into ``root`` (see the module docstring) and returns ``root`` as a Path.

    A no-op when ``root`` already holds a dataset generated with the same parameters. A ``root`` holding a shapes
    dataset with other parameters is replaced when it holds nothing else; a ``root`` holding anything the generator
    did not make (listed in its stamp) is a UserError and is never deleted. Concurrent callers (the processes of one launch) serialise on a lock file next to ``root`` and
    generate once. 512 + 64 images of 128 px take a few seconds. ``val_image_size``: (height, width) of the
    validation images (None: ``image_size`` squares, as the training images). Generating says where, in one
    warning line (logger ``dino.data``).
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{_FIELDS[name]} ({name}) must be an integer >= {low}, got {value!r}")
    if val_image_size is not None and not (
            isinstance(val_image_size, (tuple, list)) and len(val_image_size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 32
                                             for v in val_image_size)):
        raise UserError(f"{_FIELDS['val_image_size']} must be (height, width), integers >= 32, or None, got "
                        f"{val_image_size!r}")
    root = Path(root)
    params = {"version": _VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    if val_image_size is not None:  # absent when square, so the stamps of earlier square datasets still match
        params["val_image_size"] = list(val_image_size)
    if _settings(_read_stamp(root)) == params:
        return root
    lock = root.parent / f".{root.name}.lock"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock.touch(exist_ok=True)  # the lock file is the first write: an unwritable place fails here, in one line
    except OSError as err:
        raise UserError(f"data.root {root}: the shapes dataset cannot be written there ({err.strerror}: "
                        f"{err.filename}); choose a writable data.root") from None
    # Another run generating into data.root is refused at once (dino.run_lock); the processes of one launch, of
    # which only the first holds that lock, wait for each other on the FileLock and generate once.
    with run_lock(root, "data.root", hold=first_process(), lock_file=root.parent / f".{root.name}.dino-run.lock"), \
            FileLock(lock):
        if _settings(_read_stamp(root)) != params:  # another process may have generated it while we waited
            _generate(root, params)
    return root
