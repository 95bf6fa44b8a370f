"""Checking a COCO-format dataset before a long run: every problem found at once, not the first one at step 40 000.

:func:`check_split` scans one split (an images folder + its instances json) and collects :class:`Problem` s instead
of raising: the annotations file (missing, not JSON, malformed: then nothing else can be checked), each annotation
(unknown ``image_id`` or ``category_id``, a bbox that is not 4 numbers, a box training drops: negative or zero
width or height, entirely outside its image; a box partly outside, which is clipped), each image (file missing,
not readable or not decodable, decoded size differing from the json, the same file listed twice, no annotations),
and what a file from elsewhere may hold: an ``iscrowd`` other than 0 or 1, a negative ``area``, a category name with
control characters, a ``file_name`` that is absolute or climbs out of the images folder (never opened; fatal, as
:class:`~dino.data.coco.CocoDetection` refuses it).

A problem is *fatal* when it would stop training (:class:`~dino.data.coco.CocoDetection` raises on it); the others
are dropped, clipped or kept by training and only reported. An unreadable image is fatal unless the run skips
unreadable images (``data.skip_unreadable``). With ``fast``, images are only opened (header: format and size), not
decoded, so a truncated file passes.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
from tqdm.auto import tqdm

from dino.data.coco import annotation_problem, box_problem, categories_of, file_name_problem, load_instances_json
from dino.errors import UserError
from dino.untrusted import has_control, quote

__all__ = ["FATAL_KINDS", "Problem", "SplitReport", "check_split", "dataset_notes", "format_report"]

# Kinds that stop training (CocoDetection raises at construction or when the image is loaded).
FATAL_KINDS = frozenset({
    "annotations file", "unknown image_id", "unknown category_id", "bad bbox", "images folder", "missing image file",
    "unreadable image", "size differs from json", "training setup", "image too small for the model",
    "file_name outside the images folder",
})


@dataclass(frozen=True)
class Problem:
    kind: str  # e.g. "negative width", "unreadable image"
    file: str  # the image file, or the annotations file for problems of an annotation or of the json itself
    detail: str  # one line: the entry and what is wrong with it


@dataclass
class SplitReport:
    """What :func:`check_split` found in one split."""

    split: str
    annotations_file: Path
    images: int = 0
    annotations: int = 0
    categories: int = 0
    problems: list[Problem] = field(default_factory=list)
    fatal_kinds: frozenset = FATAL_KINDS

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.kind in self.fatal_kinds]


def _read_image(path: Path, fast: bool) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)``, or ``(None, reason)`` when the file cannot be opened (or, unless ``fast``,
    decoded)."""
    try:
        with PIL.Image.open(path) as image:
            if not fast:
                image.load()
            return image.size, None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        return None, (str(err).splitlines()[0] if str(err) else type(err).__name__)


def _check_categories(data: dict, path: Path, report: SplitReport) -> None:
    for cat in data["categories"]:
        name = str(cat.get("name", ""))
        if has_control(name):
            report.problems.append(Problem("control character in category name", str(path),
                                           f"category id {cat['id']} is named {quote(name)} (kept in JSON outputs, "
                                           "escaped in pictures and console lines)"))


def _check_annotations(data: dict, path: Path, report: SplitReport) -> None:
    images = {img["id"]: img for img in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        problem = annotation_problem(ann, images, category_ids)
        if problem is not None:
            report.problems.append(Problem(problem[0], str(path), f"annotation id {ann['id']} {problem[1]}"))
            continue
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            report.problems.append(Problem("iscrowd not 0 or 1", str(path),
                                           f"annotation id {ann['id']} has iscrowd {quote(crowd)} (training reads any "
                                           "value but 0 as a crowd, left out of the targets)"))
        area = ann.get("area", 0)
        if isinstance(area, (int, float)) and not isinstance(area, bool) and area < 0:
            report.problems.append(Problem("negative area", str(path),
                                           f"annotation id {ann['id']} has area {area!r} (COCO evaluation ignores it "
                                           "in every area range)"))
        image = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        W, H = image["width"], image["height"]
        kind = box_problem((x, y, w, h), W, H)
        if kind is None and (x < 0 or y < 0 or x + w > W or y + h > H):
            kind = "box partly outside (clipped)"
        if kind is not None:
            crowd = " (crowd)" if ann.get("iscrowd", 0) else ""
            report.problems.append(Problem(kind, str(path), f"annotation id {ann['id']}{crowd} has bbox {ann['bbox']} "
                                                            f"in {image['file_name']} ({W}x{H})"))


def _check_images(data: dict, images_dir: Path, report: SplitReport, fast: bool, workers: int,
                  progress: bool) -> None:
    annotated = {ann["image_id"] for ann in data["annotations"]}
    seen: dict[str, Any] = {}
    for img in data["images"]:
        name = str(images_dir / str(img["file_name"]))
        if name in seen:
            report.problems.append(Problem("duplicate image file", name, f"image ids {seen[name]} and {img['id']} "
                                                                         "both list this file"))
        seen.setdefault(name, img["id"])
        if img["id"] not in annotated:
            report.problems.append(Problem("image without annotations", name, f"image id {img['id']} has none "
                                                                              "(kept as a background image)"))
    if not images_dir.is_dir():
        report.problems.append(Problem("images folder", str(images_dir), "does not exist"))
        return
    inside = []
    for img in data["images"]:
        problem = file_name_problem(str(img["file_name"]))
        if problem is None:
            inside.append(img)
        else:  # never opened
            report.problems.append(Problem("file_name outside the images folder", str(report.annotations_file),
                                           f"image id {img['id']}: file_name {quote(str(img['file_name']))} {problem}"))
    paths = [images_dir / str(img["file_name"]) for img in inside]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without holding the GIL
        results = pool.map(lambda p: _read_image(p, fast), paths)
        bar = tqdm(results, total=len(paths), desc=f"{report.split} images", unit="img", disable=not progress,
                   dynamic_ncols=True)
        for img, path, (size, reason) in zip(inside, paths, bar):
            name = str(path)
            if size is None:
                kind = "missing image file" if not path.is_file() else "unreadable image"
                report.problems.append(Problem(kind, name, f"image id {img['id']}: {reason}"))
            elif size != (img["width"], img["height"]):
                report.problems.append(Problem("size differs from json", name, f"image id {img['id']} is "
                                               f"{size[0]}x{size[1]}, the json says {img['width']}x{img['height']}"))


def check_split(
    split: str,
    images_dir: str | os.PathLike,
    annotations_file: str | os.PathLike,
    *,
    fast: bool = False,
    skip_unreadable: bool = False,
    workers: int = 4,
    progress: bool = True,
) -> SplitReport:
    """Every problem of one split (see the module docstring); never raises for a problem of the data.

    ``fast``: open images without decoding them. ``skip_unreadable``: unreadable images are not fatal (the run will
    skip them). ``workers``: threads reading images. ``progress``: a tqdm bar over the images.
    """
    images_dir, annotations_file = Path(images_dir), Path(annotations_file)
    fatal = FATAL_KINDS - {"unreadable image"} if skip_unreadable else FATAL_KINDS
    report = SplitReport(split, annotations_file, fatal_kinds=fatal)
    try:
        data = load_instances_json(annotations_file)
        report.categories = len(categories_of(data, annotations_file)[1])
    except UserError as err:
        message, prefix = str(err), f"annotations file {annotations_file}"
        detail = message[len(prefix):].lstrip(": ") if message.startswith(prefix) else message
        report.problems.append(Problem("annotations file", str(annotations_file), detail))
        return report
    report.images, report.annotations = len(data["images"]), len(data["annotations"])
    _check_categories(data, annotations_file, report)
    _check_annotations(data, annotations_file, report)
    _check_images(data, images_dir, report, fast, workers, progress)
    return report


def dataset_notes(dataset, num_queries: int) -> list[Problem]:
    """What training accepts but a user should hear of, for a built training ``dataset``
    (:class:`~dino.data.CocoDetection`) and a model of ``num_queries`` queries: a class head larger than the number
    of categories (labels are category ids, as in the official code, so ids with gaps leave outputs no category
    uses; ids 1..N, with label 0 unused, are not mentioned), and images with more boxes than the model has queries (it can find at most ``num_queries`` objects per
    image). ``dino data check`` lists them; training logs them when it starts."""
    notes = []
    source = str(dataset.annotations_file)
    categories = len(dataset.categories)
    if dataset.num_classes > categories + 1:  # ids 1..N (one unused output, label 0) are the usual numbering
        ids = [c["id"] for c in dataset.categories]
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        notes.append(Problem("class head larger than the categories", source,
                             f"category ids {shown} make a {dataset.num_classes}-class head (labels are category ids: "
                             f"max id + 1) for {categories} categories; {dataset.num_classes - categories} outputs "
                             "belong to no category, as in the official code (renumber the ids 0..N-1 if that is not intended)"))
    counts = [len(dataset.raw_target(i)[1]) for i in range(len(dataset))]
    crowded = [i for i, n in enumerate(counts) if n > num_queries]
    if crowded:
        worst = max(crowded, key=counts.__getitem__)
        notes.append(Problem("more boxes than queries", source,
                             f"{len(crowded)} image(s) have more boxes than the model's {num_queries} queries (at most "
                             f"{counts[worst]}, image id {dataset.image_ids[worst]}): the model can find at most "
                             f"{num_queries} objects per image (raise model.transformer.num_queries to find more)"))
    return notes


def format_report(reports: Sequence[SplitReport], limit: int = 20) -> str:
    """A summary table (one column per split: images, annotations, categories, then each kind of problem found;
    ``*`` marks those that stop training), then the problems themselves, ``limit`` at most, and how many more."""
    kinds = sorted({k for r in reports for k in r.counts()},
                   key=lambda k: (k not in FATAL_KINDS, k))
    rows = [("", [r.split for r in reports])]
    rows += [(name, [str(getattr(r, name)) for r in reports]) for name in ("images", "annotations", "categories")]
    for kind in kinds:
        stops = any(kind in r.fatal_kinds for r in reports)
        rows.append((kind + (" *" if stops else ""), [str(r.counts().get(kind, 0)) for r in reports]))
    width = max(len(label) for label, _ in rows)
    cols = [max(len(values[i]) for _, values in rows) for i in range(len(reports))]
    lines = ["  ".join([label.ljust(width), *(v.rjust(c) for v, c in zip(values, cols))]).rstrip()
             for label, values in rows]
    if kinds:
        lines.append("(* stops training)")
    problems = [(r.split, p, p.kind in r.fatal_kinds) for r in reports for p in r.problems]
    # Fatal problems first, so a capped listing still shows what must be fixed.
    problems.sort(key=lambda item: not item[2])
    if problems:
        shown = problems[:limit]
        title = f"problems ({len(shown)} of {len(problems)}):" if len(problems) > limit else "problems:"
        lines += ["", title]
        lines += [f"  {split}: {p.kind}{' *' if fatal else ''}: {p.file}: {p.detail}" for split, p, fatal in shown]
        if len(problems) > limit:
            lines.append(f"  ... and {len(problems) - limit} more (--max-listed N lists more)")
    return "\n".join(lines)
