"""``dino predict``: detections on image files, as ``predictions.json`` and one picture per image.

Images are read as a viewer shows them (:mod:`dino.predict.images`): EXIF orientation applied, 16-bit and float
grayscale scaled to 8 bits, transparency composited on white. Training and evaluation do NOT apply EXIF orientation:
a COCO dataset keeps its stored (annotated) orientation, since its boxes were drawn on the stored pixels.

Pre- and post-processing are those of ``dino eval`` and the same for every backend (:mod:`dino.predict.preprocess`),
and detections are scaled back to the original image's pixels. Only images of the same resized size share a forward
pass: padding an image to a larger neighbour's size changes DINO's outputs for it (up to 2.5 px and 0.124 in score,
issue 19), so an image's detections do not depend on the rest of the batch.

``predictions.json``::

    {"backend": "pytorch", "model": "...", "score_threshold": 0.3, "max_detections": 100, "complete": true,
     "images": [{"file": "in/cat.jpg", "picture": "cat.jpg", "width": 640, "height": 480,
                 "detections": [{"box": [x1, y1, x2, y2], "score": 0.93, "label": 17, "category_id": 17,
                                 "name": "cat"}, ...]}, ...],
     "failed": [{"file": "in/broken.jpg", "error": "..."}]}

``complete`` is false only when the run stopped on an error (the images done so far are listed). ``failed`` lists
the files skipped: not readable images, or images the model cannot take (so elongated that a side resizes to under
1 px, or too small for the model's queries). A picture that could not be saved has ``"picture": null`` and a
``"picture_error"``; its detections are still listed. Pictures are never written over an input: an output folder
holding an input, or inside a scanned input folder, is refused (:func:`dino.predict.paths.check_output_dir`); an image given twice
gets two records and two pictures (``cat.jpg``, ``cat_1.jpg``).
``box`` is xyxy in the original image's pixels (not clipped, as ``dino eval``), detections sorted by descending score;
``label`` is the model's class index, ``category_id`` the dataset's id for it (equal for COCO's 91-slot models).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import PIL.Image
import torch
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from dino.config import DataConfig
from dino.durable import give_new_file_mode
from dino.errors import UserError
from dino.predict.backend import Backend
from dino.predict.draw import draw_detections
from dino.predict.images import read_image
from dino.predict.labels import LabelNames
from dino.predict.paths import check_output_dir, picture_names
from dino.predict.preprocess import Preprocessor

PICTURE_QUALITY = 92


@dataclasses.dataclass
class PredictSummary:
    images: list[dict]  # records written, in input order
    failed: list[dict]  # {"file", "error"}: files skipped (unreadable, or an image the model cannot take)
    json_path: Path

    @property
    def pictures_not_saved(self) -> list[dict]:
        return [r for r in self.images if r["picture"] is None]


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        give_new_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_picture(picture: torch.Tensor, path: Path) -> None:
    array = picture.permute(1, 2, 0).contiguous().numpy()
    _write_atomic(path, lambda tmp: PIL.Image.fromarray(array).save(tmp, format="JPEG", quality=PICTURE_QUALITY))


def _detections(boxes, scores, labels, resized, original, score_threshold, max_detections, names) -> list[dict]:
    """One image's detections above the threshold, boxes scaled from the resized image to the original's pixels."""
    keep = scores >= score_threshold
    boxes, scores, labels = boxes[keep][:max_detections], scores[keep][:max_detections], labels[keep][:max_detections]
    (rh, rw), (oh, ow) = resized, original
    boxes = boxes.float() * torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh])
    out = []
    for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        info = names[label]
        out.append({"box": [round(v, 2) for v in box], "score": round(score, 4), "label": int(label),
                    "category_id": info.category_id, "name": info.name})
    return out


@dataclasses.dataclass
class _Item:
    """One input on its way through a chunk: its position in the input list, file, picture name, image, tensor."""

    index: int
    path: Path
    picture: str
    image: PIL.Image.Image
    tensor: torch.Tensor  # (3, h, w) resized and normalised


def _same_size_groups(items: list[_Item], fixed_size: bool) -> list[list[_Item]]:
    """The items batched together: those of one resized size (a fixed-size graph pads every image to its canvas, so
    there any images may share a batch). Padding an image to a neighbour's size changes DINO's outputs for it
    (deformable attention samples the whole padded canvas), so images of different sizes never share a batch."""
    groups: dict[tuple[int, ...] | None, list[_Item]] = {}
    for item in items:
        groups.setdefault(None if fixed_size else tuple(item.tensor.shape), []).append(item)
    return list(groups.values())


class _Run:
    """The state of one ``predict_files`` call: records, skipped files, and how each item is reported."""

    def __init__(self, backend, preprocess, names, output_dir, score_threshold, max_detections, bar):
        self.backend, self.preprocess, self.names, self.output_dir = backend, preprocess, names, output_dir
        self.score_threshold, self.max_detections, self.bar = score_threshold, max_detections, bar
        self.records: list[dict] = []
        self.failed: list[dict] = []

    def skip(self, path: Path, message: str) -> None:
        tqdm.write(f"dino predict: skipped {message}", file=sys.stderr)
        self.failed.append({"file": str(path), "error": message})
        self.bar.update(1)

    def load(self, index: int, path: Path, picture: str) -> _Item | None:
        """The item of one file, or None (named on stderr, listed as failed) when it cannot be read or resized."""
        try:
            image = read_image(path)
        except UserError as err:
            self.skip(path, str(err))
            return None
        try:
            return _Item(index, path, picture, image, self.preprocess.transform(image))
        except UserError as err:
            self.skip(path, f"{path}: {err}")
            return None

    def predict(self, group: list[_Item]) -> list[dict]:
        """Records of one batch of same-size items; all of them skipped when the model refuses their size."""
        images, mask = self.preprocess.batch([item.tensor for item in group])
        try:
            boxes, scores, labels = self.backend.run(images.to(self.backend.device), mask.to(self.backend.device))
        except UserError as err:  # the model cannot take images of this size (e.g. fewer tokens than queries)
            for item in group:
                self.skip(item.path, f"{item.path}: {item.image.width}x{item.image.height} px: {err}")
            return []
        boxes, scores, labels = boxes.float().cpu(), scores.float().cpu(), labels.cpu()
        return [self.record(item, boxes[i], scores[i], labels[i]) for i, item in enumerate(group)]

    def record(self, item: _Item, boxes, scores, labels) -> dict:
        """The record of one image; its picture saved (a picture that cannot be saved is named, the record kept)."""
        image = item.image
        dets = _detections(boxes, scores, labels, tuple(item.tensor.shape[-2:]), (image.height, image.width),
                           self.score_threshold, self.max_detections, self.names)
        record = {"file": str(item.path), "picture": item.picture, "width": image.width, "height": image.height,
                  "detections": dets}
        drawn = draw_detections(F.pil_to_tensor(image), torch.tensor([d["box"] for d in dets]).reshape(-1, 4),
                                [d["label"] for d in dets], [f"{d['name']} {d['score']:.2f}" for d in dets])
        try:
            _save_picture(drawn, self.output_dir / item.picture)
        except (OSError, ValueError) as err:  # JPEG size limits, a full disk, a folder in the way
            message = f"{item.path}: picture {self.output_dir / item.picture} not saved ({type(err).__name__}: {err})"
            tqdm.write(f"dino predict: {message}; its detections are in predictions.json", file=sys.stderr)
            record["picture"], record["picture_error"] = None, message
        self.bar.update(1)
        return record


def predict_files(
    backend: Backend,
    files: list[Path],
    data_cfg: DataConfig,
    names: LabelNames,
    output_dir: str | os.PathLike,
    batch_size: int = 1,
    score_threshold: float = 0.3,
    max_detections: int = 100,
    progress: bool = False,
    description: str = "",
) -> PredictSummary:
    """Runs ``backend`` on ``files`` and writes ``output_dir/predictions.json`` and one picture per readable image.

    A file that is not a readable image, or an image the model cannot take (too elongated), is named on stderr,
    listed under ``"failed"`` and skipped; a picture that cannot be saved is named and its record kept with
    ``"picture": null``; the other files are still processed. ``batch_size`` consecutive files are read together and
    those of the same resized size share a forward pass, so an image's detections do not depend on its neighbours.
    UserError (nothing written) when ``output_dir`` holds an input (:func:`dino.predict.paths.check_output_dir`).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= score_threshold <= 1.0:
        raise UserError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    if max_detections < 1:
        raise UserError(f"--max-detections must be >= 1, got {max_detections}")
    if backend.max_batch is not None:
        batch_size = min(batch_size, backend.max_batch)
    output_dir = check_output_dir(output_dir, files)
    output_dir.mkdir(parents=True, exist_ok=True)
    pictures = picture_names(files)
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress, dynamic_ncols=True)
    run = _Run(backend, Preprocessor(data_cfg, backend.input_size), names, output_dir, score_threshold,
               max_detections, bar)
    json_path = output_dir / "predictions.json"
    complete = False
    try:
        for start in range(0, len(files), batch_size):
            chunk = [run.load(i, files[i], pictures[i]) for i in range(start, min(start + batch_size, len(files)))]
            chunk = [item for item in chunk if item is not None]
            done = []
            for group in _same_size_groups(chunk, backend.input_size is not None):
                done.extend(zip((item.index for item in group), run.predict(group)))
            run.records.extend(record for _, record in sorted(done, key=lambda pair: pair[0]))
        complete = True
    finally:
        # Also when a batch fails (out of memory, a bug): what was predicted so far is kept, marked incomplete.
        bar.close()
        result = {"backend": getattr(backend, "name", type(backend).__name__), "model": description,
                  "score_threshold": score_threshold, "max_detections": max_detections, "complete": complete,
                  "images": run.records, "failed": run.failed}
        _write_atomic(json_path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return PredictSummary(run.records, run.failed, json_path)
