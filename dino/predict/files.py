"""``dino predict``: detections on image files, as ``predictions.json`` and one picture per image.

Images are read as a viewer shows them (:mod:`dino.predict_images`): EXIF orientation applied, 16-bit and float
grayscale scaled to 8 bits, transparency composited on white. Training and evaluation do NOT apply EXIF orientation:
a COCO dataset keeps its stored (annotated) orientation, since its boxes were drawn on the stored pixels.

Pre- and post-processing are those of ``dino eval`` and the same for every backend: each image is resized by the
recipe's validation transform (``dino.data.build_transforms(data, "val")``: shorter side ``data.val_scale``, longer
side at most ``data.val_max_size``, ImageNet normalisation), padded at the bottom/right with the padding mask True
on padding (``dino.data.pad_images``), and detections are scaled back to the original image's pixels. Only images of
the same resized size share a forward pass: padding an image to a larger neighbour's size changes DINO's outputs for
it (up to 2.5 px and 0.124 in score, issue 19), so an image's detections do not depend on the rest of the batch.

A backend is anything with the deploy-graph contract (docs/ARCHITECTURE.md, CONTRACTS item 4)::

    boxes, scores, labels = backend.run(images, mask)
    # images (B, 3, H, W) float32 normalised, mask (B, H, W) bool True on padding ->
    # boxes (B, K, 4) xyxy pixels of each image's valid (resized) region, scores (B, K) descending, labels (B, K) int64

plus ``device``, ``input_size`` ((H, W) of a fixed-size graph, or None) and ``max_batch`` (None: any batch).
:class:`ModelBackend` runs a PyTorch model here; ``dino_export.predict_backends`` has ONNX Runtime, AOTInductor and
TensorRT. A fixed-size graph gets the batch padded to its size; an image whose evaluation size does not fit it is
resized to fit instead (keeping its aspect ratio), which is the only case where a graph sees other pixels than eval.

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
holding an input, or inside a scanned input folder, is refused (:func:`dino.predict_paths.check_output_dir`); an image given twice
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
from typing import Protocol

import PIL.Image
import torch
from torch import nn
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from dino.config import DataConfig
from dino.data import build_transforms, pad_images
from dino.data.transforms import resized_size
from dino.durable import give_new_file_mode
from dino.errors import UserError
from dino.postprocess import postprocess
from dino.predict_draw import draw_detections
from dino.predict_images import open_image
from dino.predict_labels import LabelNames
from dino.predict_paths import check_output_dir, picture_names

PICTURE_QUALITY = 92


class Backend(Protocol):
    device: torch.device
    input_size: tuple[int, int] | None
    max_batch: int | None

    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) float (height, width) of each image's unpadded region, from ``mask (B, H, W)`` True on padding."""
    valid = ~mask
    return torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], 1).float()


class ModelBackend:
    """A DINO model (``model(images, mask) -> {pred_logits, pred_boxes}``) in PyTorch, with top-k post-processing."""

    input_size = None
    max_batch = None
    name = "pytorch"

    def __init__(self, model: nn.Module, num_select: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.num_select = num_select

    @torch.no_grad()
    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images, mask)
        # pred_boxes are normalised by each image's valid region, so scaling by it gives that region's pixels.
        scores, labels, boxes = postprocess(out["pred_logits"].float(), out["pred_boxes"].float(), valid_sizes(mask),
                                            self.num_select)
        return boxes, scores, labels


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


def read_image(path: Path) -> PIL.Image.Image:
    """The image at ``path`` as a viewer shows it (:mod:`dino.predict_images`: upright, RGB, transparency on white);
    UserError naming the file when it is not a readable image (also when truncated)."""
    try:
        return open_image(path)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        raise UserError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


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
    UserError (nothing written) when ``output_dir`` holds an input (:func:`dino.predict_paths.check_output_dir`).
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
