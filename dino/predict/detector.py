"""``dino.Detector``: a trained model (checkpoint or exported artifact) as one Python object that detects on images.

    det = dino.Detector.load("outputs/quickstart")          # run folder, model.safetensors, .pth, .onnx, .pt2, .engine
    result = det("photo.jpg")                               # or a PIL image, numpy (H, W, 3) uint8, (3, H, W) tensor
    result.boxes, result.scores, result.labels, result.names
    result.draw("photo.jpg").save("photo_boxes.jpg")

It is ``dino predict``'s one code path (:func:`dino.predict.files.predict_files` writes what it returns): images are
taken as a viewer shows them (:func:`dino.predict.images.as_picture`: EXIF orientation, 16-bit, alpha), pre- and
post-processed as in ``dino eval`` (:mod:`dino.predict.preprocess`), and only images of the same resized size share a
forward pass, so an image's detections do not depend on the rest of the batch.

Exported artifacts are run by :func:`dino.predict.artifacts.open_artifact` (ONNX Runtime, OpenVINO and TensorRT are
imported only when such a file is loaded).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchvision.transforms.v2 import functional as F

from dino.api_arguments import (check_choice, check_device_argument, check_fraction, check_int, check_overrides,
                                check_path, check_paths, check_recipe, check_size)
from dino.config import DataConfig, Recipe
from dino.device import check_device
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint, checkpoint_file, read_categories
from dino.models.memory import check_forward_fits, check_resize_fits
from dino.predict.artifacts import KINDS, open_artifact
from dino.predict.backend import Backend, ModelBackend
from dino.predict.draw import draw_detections
from dino.predict.images import as_picture
from dino.predict.labels import LabelNames, artifact_label_names
from dino.predict.preprocess import Preprocessor
from dino.predict.recipe import detector_recipe

Image = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt")


@dataclasses.dataclass(frozen=True)
class Detections:
    """The detections of one image, in that image's own pixels (as a viewer shows it: EXIF orientation applied).

    ``boxes``: (N, 4) float32 xyxy in pixels (not clipped, as ``dino eval``); ``scores``: (N,) float32 in [0, 1],
    descending; ``labels``: (N,) int64, the model's class index (the dataset's category id, as in the official code);
    ``names``: N category names; ``category_ids``: N dataset category ids; ``width`` / ``height``: the image's size in
    pixels. N is at most the call's ``max_detections``, every score at least its ``score_threshold``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    category_ids: list[int]
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        """The image's record in ``predictions.json`` (without ``file`` and ``picture``, which ``dino predict`` adds):
        ``{"width", "height", "detections": [{"box": [x1, y1, x2, y2] (pixels, 2 decimals), "score" (4 decimals),
        "label", "category_id", "name"}, ...]}``."""
        detections = [
            {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": int(label), "category_id": cid,
             "name": name}
            for box, score, label, cid, name in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(),
                                                    self.category_ids, self.names)
        ]
        return {"width": self.width, "height": self.height, "detections": detections}

    def draw(self, image: Image) -> PIL.Image.Image:
        """The picture ``dino predict`` saves for ``image`` (the image these detections are of, in any form
        :meth:`Detector.__call__` takes): boxes, names and scores drawn, enlarged to at least 480 px on the shorter
        side (:func:`dino.predict.draw.draw_detections`). Returns an RGB PIL image; UserError when ``image`` is not
        ``width`` x ``height`` pixels once upright."""
        picture = as_picture(image)
        if picture.size != (self.width, self.height):
            raise UserError(f"draw: the image is {picture.width}x{picture.height} px once upright, these detections "
                            f"are of a {self.width}x{self.height} image")
        detections = self.to_dict()["detections"]  # drawn from the rounded values, as predictions.json lists them
        drawn = draw_detections(F.pil_to_tensor(picture),
                                torch.tensor([d["box"] for d in detections]).reshape(-1, 4),
                                [d["label"] for d in detections],
                                [f"{d['name']} {d['score']:.2f}" for d in detections])
        return PIL.Image.fromarray(drawn.permute(1, 2, 0).contiguous().numpy())


class Detector:
    """A model and everything needed to detect with it: backend, ``dino eval``'s pre-processing, label names.

    ``Detector(backend, data, names)`` wraps any backend (:class:`dino.predict.backend.Backend`); most users call
    :meth:`load`. ``description`` names the model in one line (``predictions.json``'s ``"model"``).
    """

    def __init__(self, backend: Backend, data: DataConfig, names: LabelNames, description: str = ""):
        self.backend = backend
        self.preprocess = Preprocessor(data, backend.input_size)
        self.names = names
        self.description = description

    @classmethod
    def load(cls, path: str | os.PathLike, recipe: Recipe | str | None = None, device: str | torch.device | None = None,
             *, overrides: Sequence[str] = (), checkpoint: str | os.PathLike | None = None, kind: str | None = None,
             plugin_libs: Sequence[str | os.PathLike] = (), image_size: tuple[int, int] | None = None,
             threads: int | None = None) -> "Detector":
        """The detector of ``path``: ``model.safetensors``, an official DINO ``.pth``, a training run's folder or one
        of its checkpoint folders (their ``model.safetensors``; a line on stderr says which file was taken), or an
        exported artifact: ONNX graph (``.onnx``, run in ONNX Runtime), OpenVINO IR (``.xml``, CPU), AOTInductor
        package (``.pt2``), TensorRT engine (``.engine``; CUDA), chosen by suffix or by ``kind`` (``"onnx"``,
        ``"openvino"``, ``"aoti"``, ``"engine"``; ``dino.predict.artifacts.KINDS``).

        ``recipe``: a :class:`dino.config.Recipe`, a recipe name or file, or a preset name; None reads the recipe the
        checkpoint was trained with from its metadata (``checkpoint`` for an artifact), and is refused in one line
        when it records none. ``overrides``: ``section.field=value`` applied to the recipe (``--set``).
        ``checkpoint``: for an artifact, the checkpoint it was exported from, for its recipe and category names.
        ``device``: ``"cpu"``, ``"cuda"`` (default: cuda when available; ONNX graphs default to the CPU).
        ``plugin_libs``: TensorRT plugin libraries of a plugin engine; ``image_size``: (H, W) of an AOTInductor
        package that does not record it; ``threads``: inference threads of an OpenVINO IR (None: every core).
        UserError (one line naming the file) for a file it cannot use.
        """
        path, recipe, device = check_path(path, "path"), check_recipe(recipe), check_device_argument(device)
        overrides, checkpoint = check_overrides(overrides), check_path(checkpoint, "checkpoint", optional=True)
        kind = check_choice(kind, "kind", [k.name for k in KINDS], optional=True)
        plugin_libs, image_size = check_paths(plugin_libs, "plugin_libs"), check_size(image_size, optional=True)
        if kind is None and not path.exists() and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise UserError(f"{path} does not exist")
        if kind is None and (path.is_dir() or path.suffix.lower() in CHECKPOINT_SUFFIXES):
            weights = checkpoint_file(path)
            cfg = detector_recipe(recipe, weights, overrides)
            device = _device(device, "cuda" if torch.cuda.is_available() else "cpu")
            model = build_model_from_checkpoint(cfg.model, weights)
            names = LabelNames.build(cfg.model.num_classes, read_categories(weights))
            check_resize_fits(model, cfg.data.val_scale, cfg.data.val_max_size, 1, device)
            return cls(ModelBackend(model, cfg.model.num_select, device), cfg.data, names,
                       f"{cfg.name}, weights {weights}")
        weights = checkpoint_file(checkpoint) if checkpoint is not None else None
        device = _device(device, "cpu" if kind == "onnx" or path.suffix.lower() == ".onnx" or not
                         torch.cuda.is_available() else "cuda")
        backend, described = open_artifact(path, device, kind, list(plugin_libs), image_size, threads)
        cfg = detector_recipe(recipe, weights, overrides, artifact=path)
        names = artifact_label_names(getattr(backend, "labels", None), cfg.model.num_classes, cfg.name,
                                     read_categories(weights) if weights is not None else None, str(path))
        return cls(backend, cfg.data, names, f"{cfg.name}, {described}")

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.backend.device

    def __call__(self, images: Image | Sequence[Image], score_threshold: float = 0.3, max_detections: int = 100,
                 batch_size: int = 8) -> Detections | list[Detections]:
        """Detections of one image, or a list of them for a list (or tuple) of images, in the same order.

        Each image is a path, a PIL image, a numpy ``(H, W, 3)`` uint8 RGB array (``(H, W, 4)`` RGBA, ``(H, W)``
        gray) or a ``(3, H, W)`` tensor (uint8, or float in [0, 1]); see :func:`dino.predict.images.as_picture`.
        Keeps detections scoring at least ``score_threshold`` (in [0, 1]), at most ``max_detections`` per image.
        ``batch_size``: at most this many images of one resized size share a forward pass (memory; the detections
        do not depend on it). UserError naming the image when one cannot be read or is too elongated for the model.
        """
        score_threshold = check_fraction(score_threshold, "score_threshold")
        max_detections, batch_size = check_int(max_detections, "max_detections"), check_int(batch_size, "batch_size")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        pictures = [as_picture(image) for image in items]
        results = self.detect_pictures(pictures, score_threshold, max_detections, batch_size)
        for i, result in enumerate(results):
            if isinstance(result, UserError):
                name = items[i] if isinstance(items[i], (str, os.PathLike)) else f"image {i}"
                raise UserError(f"{name}: {result}")
        return results[0] if single else results

    def detect_pictures(self, pictures: Sequence[PIL.Image.Image], score_threshold: float, max_detections: int,
                        batch_size: int | None = None) -> list[Detections | UserError]:
        """For each upright RGB picture (:func:`dino.predict.images.as_picture`), its :class:`Detections`, or the
        UserError that kept it from the model (so elongated that a side resizes to under 1 px; a size the model
        cannot take), in order. Pictures of one resized size (any, for a fixed-size graph) share a forward pass of
        at most ``batch_size`` (and the backend's ``max_batch``) images."""
        results: list[Detections | UserError | None] = [None] * len(pictures)
        tensors: dict[int, torch.Tensor] = {}
        for i, picture in enumerate(pictures):
            try:
                tensors[i] = self.preprocess.transform(picture)  # (3, h, w) resized and normalised
            except UserError as err:
                results[i] = err
        for group in self._batches(tensors, batch_size):
            images, mask = self.preprocess.batch([tensors[i] for i in group])
            try:
                if isinstance(self.backend, ModelBackend):  # refused before the allocation, not by the allocator
                    check_forward_fits(self.backend.model, len(group), *images.shape[-2:], self.device, "resized")
                boxes, scores, labels = self.backend.run(images.to(self.device), mask.to(self.device))
            except UserError as err:  # the model cannot take images of this size (e.g. fewer tokens than queries)
                for i in group:
                    results[i] = UserError(f"{pictures[i].width}x{pictures[i].height} px: {err}")
                continue
            boxes, scores, labels = boxes.float().cpu(), scores.float().cpu(), labels.cpu()
            for k, i in enumerate(group):
                results[i] = self._detections(boxes[k], scores[k], labels[k], tuple(tensors[i].shape[-2:]),
                                              pictures[i], score_threshold, max_detections)
        return results

    def _batches(self, tensors: dict[int, torch.Tensor], batch_size: int | None) -> list[list[int]]:
        """Indices run together: those of one resized size (a fixed-size graph pads every image to its canvas, so
        there any images may share a batch), in pieces of at most ``batch_size`` / ``max_batch``. Padding an image
        to a neighbour's size changes DINO's outputs for it (deformable attention samples the whole padded canvas,
        up to 2.5 px and 0.124 in score, issue 19), so images of different sizes never share a batch."""
        fixed = self.backend.input_size is not None
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for i, tensor in tensors.items():
            groups.setdefault(None if fixed else tuple(tensor.shape), []).append(i)
        limits = [n for n in (batch_size, self.backend.max_batch) if n is not None]
        size = min(limits) if limits else None
        return [group[start:start + size] if size else group
                for group in groups.values() for start in range(0, len(group), size or len(group))]

    def _detections(self, boxes, scores, labels, resized: tuple[int, int], picture: PIL.Image.Image,
                    score_threshold: float, max_detections: int) -> Detections:
        """One image's detections above the threshold, boxes (K, 4) scaled from the resized image's pixels to the
        picture's."""
        keep = scores >= score_threshold
        boxes, scores, labels = (boxes[keep][:max_detections], scores[keep][:max_detections],
                                 labels[keep][:max_detections])
        (rh, rw), (oh, ow) = resized, (picture.height, picture.width)
        boxes = boxes.float() * torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh])
        infos = [self.names[label] for label in labels.tolist()]
        return Detections(boxes, scores.float(), labels.long(), [info.name for info in infos],
                          [info.category_id for info in infos], picture.width, picture.height)


def _device(device: str | torch.device | None, default: str) -> torch.device:
    device = str(device) if device is not None else default
    return check_device(device, "device")
