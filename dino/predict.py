"""``dino predict``: detections on image files, as ``predictions.json`` and one picture per image.

Pre- and post-processing are those of ``dino eval`` and the same for every backend: each image is resized by the
recipe's validation transform (``dino.data.build_transforms(data, "val")``: shorter side ``data.val_scale``, longer
side at most ``data.val_max_size``, ImageNet normalisation), a batch is padded at the bottom/right with the padding
mask True on padding (``dino.data.pad_images``), and detections are scaled back to the original image's pixels.

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

``complete`` is false only when the run stopped on an error (the images done so far are listed).
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
from dino.errors import UserError
from dino.postprocess import postprocess
from dino.predict_draw import draw_detections
from dino.predict_labels import LabelNames

PICTURE_SUFFIX = ".jpg"
PICTURE_QUALITY = 92
_UMASK = os.umask(0o22)
os.umask(_UMASK)


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
        self.transform = build_transforms(data_cfg, "val")
        self._fitted: dict[bool, object] = {}

    def _transform_for(self, height: int, width: int):
        if self.input_size is None:
            return self.transform
        cfg = self.data_cfg
        out_h, out_w = resized_size(height, width, cfg.val_scale, cfg.val_max_size)
        max_h, max_w = self.input_size
        if out_h <= max_h and out_w <= max_w:
            return self.transform
        landscape = height <= width
        if landscape not in self._fitted:
            short_limit, long_limit = (max_h, max_w) if landscape else (max_w, max_h)
            fitted = dataclasses.replace(cfg, val_scale=min(cfg.val_scale, short_limit),
                                         val_max_size=min(cfg.val_max_size, long_limit))
            self._fitted[landscape] = build_transforms(fitted, "val")
        return self._fitted[landscape]

    def __call__(self, pictures: list[PIL.Image.Image]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        tensors = [self._transform_for(p.height, p.width)(p).as_subclass(torch.Tensor) for p in pictures]
        images, mask = pad_images(tensors, self.data_cfg.size_divisibility)
        if self.input_size is not None:
            height, width = self.input_size
            pad = (0, width - images.shape[-1], 0, height - images.shape[-2])
            if min(pad) < 0:  # size_divisibility rounded past the graph's size
                raise UserError(f"images padded to {tuple(images.shape[-2:])} exceed the graph input {self.input_size}; "
                                "set data.size_divisibility=1")
            images = nn.functional.pad(images, pad)
            mask = nn.functional.pad(mask, pad, value=True)
        return images, mask, [tuple(t.shape[-2:]) for t in tensors]


def read_image(path: Path) -> PIL.Image.Image:
    """The RGB image at ``path``; UserError naming the file when it is not a readable image (also when truncated)."""
    try:
        with PIL.Image.open(path) as im:
            return im.convert("RGB")  # decodes fully: a truncated file fails here, not later
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        raise UserError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def list_inputs(inputs: list[str | os.PathLike]) -> tuple[list[Path], bool]:
    """Files to predict on: the given files, and every non-hidden file of the given folders (sorted, not recursive).

    Returns (files, whether a folder was given). UserError for a path that does not exist or an empty folder.
    """
    files, folder = [], False
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            folder = True
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"input folder {path} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist")
    return files, folder


@dataclasses.dataclass
class PredictSummary:
    images: list[dict]
    failed: list[dict]
    json_path: Path


def _picture_names(files: list[Path]) -> list[str]:
    """One picture name per input (``stem.jpg``), made unique when two inputs share a stem."""
    names, used = [], set()
    for path in files:
        name, n = f"{path.stem}{PICTURE_SUFFIX}", 1
        while name in used:
            name, n = f"{path.stem}_{n}{PICTURE_SUFFIX}", n + 1
        used.add(name)
        names.append(name)
    return names


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; outputs get the usual permissions
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

    A file that is not a readable image is reported (one line on stderr naming it), listed under ``"failed"``, and
    skipped; the others are still processed. Returns the records written.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= score_threshold <= 1.0:
        raise UserError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    if max_detections < 1:
        raise UserError(f"--max-detections must be >= 1, got {max_detections}")
    if backend.max_batch is not None:
        batch_size = min(batch_size, backend.max_batch)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    preprocess = Preprocessor(data_cfg, backend.input_size)
    pictures = dict(zip(files, _picture_names(files)))
    records, failed = [], []
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress, dynamic_ncols=True)
    json_path = output_dir / "predictions.json"
    complete = False
    try:
        for start in range(0, len(files), batch_size):
            chunk = []
            for path in files[start:start + batch_size]:
                try:
                    chunk.append((path, read_image(path)))
                except UserError as err:
                    tqdm.write(f"dino predict: skipped {err}", file=sys.stderr)
                    failed.append({"file": str(path), "error": str(err)})
                    bar.update(1)
            if not chunk:
                continue
            images, mask, resized = preprocess([image for _, image in chunk])
            boxes, scores, labels = backend.run(images.to(backend.device), mask.to(backend.device))
            boxes, scores, labels = boxes.float().cpu(), scores.float().cpu(), labels.cpu()
            for i, (path, image) in enumerate(chunk):
                dets = _detections(boxes[i], scores[i], labels[i], resized[i], (image.height, image.width),
                                   score_threshold, max_detections, names)
                drawn = draw_detections(F.pil_to_tensor(image), torch.tensor([d["box"] for d in dets]).reshape(-1, 4),
                                        [d["label"] for d in dets], [f"{d['name']} {d['score']:.2f}" for d in dets])
                _save_picture(drawn, output_dir / pictures[path])
                records.append({"file": str(path), "picture": pictures[path], "width": image.width,
                                "height": image.height, "detections": dets})
                bar.update(1)
        complete = True
    finally:
        # Also when a batch fails (out of memory, a bug): what was predicted so far is kept, marked incomplete.
        bar.close()
        result = {"backend": getattr(backend, "name", type(backend).__name__), "model": description,
                  "score_threshold": score_threshold, "max_detections": max_detections, "complete": complete,
                  "images": records, "failed": failed}
        _write_atomic(json_path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return PredictSummary(records, failed, json_path)
