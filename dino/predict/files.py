"""``dino predict``: detections on image files, as ``predictions.json`` and one picture per image.

Images are read as a viewer shows them (:mod:`dino.predict.images`): EXIF orientation applied, 16-bit and float
grayscale scaled to 8 bits, transparency composited on white. Training and evaluation do NOT apply EXIF orientation:
a COCO dataset keeps its stored (annotated) orientation, since its boxes were drawn on the stored pixels.

The detections are those of :class:`dino.predict.detector.Detector` (``dino.Detector``), the one code path of the
Python API and the command: ``dino eval``'s pre- and post-processing for every backend, boxes scaled back to the
original image's pixels, and only images of the same resized size in one forward pass, so an image's detections do
not depend on the rest of the batch.

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
holding an input, or inside a scanned input folder, is refused (:func:`dino.predict.paths.check_output_dir`); an
image given twice gets two records and two pictures (``cat.jpg``, ``cat_1.jpg``).
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
from tqdm.auto import tqdm

from dino.api_arguments import check_fraction, check_int
from dino.durable import give_new_file_mode, make_output_dir
from dino.errors import UserError
from dino.predict.detector import Detector, Detections
from dino.predict.images import read_image
from dino.predict.paths import check_output_dir, picture_names

PICTURE_QUALITY = 92


@dataclasses.dataclass
class PredictSummary:
    """What one :func:`predict_files` call wrote."""

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


def _save_picture(picture: PIL.Image.Image, path: Path) -> None:
    _write_atomic(path, lambda tmp: picture.save(tmp, format="JPEG", quality=PICTURE_QUALITY))


class _Run:
    """The state of one ``predict_files`` call: records, skipped files, and how each file is reported."""

    def __init__(self, output_dir: Path, bar):
        self.output_dir, self.bar = output_dir, bar
        self.records: list[dict] = []
        self.failed: list[dict] = []

    def skip(self, path: Path, message: str) -> None:
        tqdm.write(f"dino predict: skipped {message}", file=sys.stderr)
        self.failed.append({"file": str(path), "error": message})
        self.bar.update(1)

    def record(self, path: Path, picture_name: str, image: PIL.Image.Image, result: Detections) -> None:
        """The record of one image; its picture saved (a picture that cannot be saved is named, the record kept)."""
        record = {"file": str(path), "picture": picture_name, **result.to_dict()}
        try:
            _save_picture(result.draw(image), self.output_dir / picture_name)
        except (OSError, ValueError) as err:  # JPEG size limits, a full disk, a folder in the way
            message = f"{path}: picture {self.output_dir / picture_name} not saved ({type(err).__name__}: {err})"
            tqdm.write(f"dino predict: {message}; its detections are in predictions.json", file=sys.stderr)
            record["picture"], record["picture_error"] = None, message
        self.records.append(record)
        self.bar.update(1)


def predict_files(
    detector: Detector,
    files: list[Path],
    output_dir: str | os.PathLike,
    batch_size: int = 1,
    score_threshold: float = 0.3,
    max_detections: int = 100,
    progress: bool = False,
) -> PredictSummary:
    """Runs ``detector`` on ``files`` and writes ``output_dir/predictions.json`` and one picture per readable image.

    A file that is not a readable image, or an image the model cannot take (too elongated), is named on stderr,
    listed under ``"failed"`` and skipped; a picture that cannot be saved is named and its record kept with
    ``"picture": null``; the other files are still processed. ``batch_size`` consecutive files are read together and
    those of the same resized size share a forward pass, so an image's detections do not depend on its neighbours.
    UserError (nothing written) when ``output_dir`` holds an input (:func:`dino.predict.paths.check_output_dir`).
    """
    batch_size, max_detections = check_int(batch_size, "--batch-size"), check_int(max_detections, "--max-detections")
    score_threshold = check_fraction(score_threshold, "--score-threshold")
    if detector.backend.max_batch is not None:
        batch_size = min(batch_size, detector.backend.max_batch)
    output_dir = make_output_dir(check_output_dir(output_dir, files), "--output")  # one line when not writable
    pictures = picture_names(files)
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress, dynamic_ncols=True)
    run = _Run(output_dir, bar)
    json_path = output_dir / "predictions.json"
    complete = False
    try:
        for start in range(0, len(files), batch_size):
            chunk = []
            for i in range(start, min(start + batch_size, len(files))):
                try:
                    chunk.append((files[i], pictures[i], read_image(files[i])))
                except UserError as err:
                    run.skip(files[i], str(err))
            results = detector.detect_pictures([image for _, _, image in chunk], score_threshold, max_detections)
            for (path, picture_name, image), result in zip(chunk, results):
                if isinstance(result, UserError):
                    run.skip(path, f"{path}: {result}")
                else:
                    run.record(path, picture_name, image, result)
        complete = True
    finally:
        # Also when a batch fails (out of memory, a bug): what was predicted so far is kept, marked incomplete.
        bar.close()
        backend = detector.backend
        result = {"backend": getattr(backend, "name", type(backend).__name__), "model": detector.description,
                  "score_threshold": score_threshold, "max_detections": max_detections, "complete": complete,
                  "images": run.records, "failed": run.failed}
        _write_atomic(json_path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return PredictSummary(run.records, run.failed, json_path)
