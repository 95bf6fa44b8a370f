"""``dino.evaluate`` and ``dino eval``: COCO AP of a checkpoint or of an exported artifact (ONNX graph, OpenVINO IR,
AOTInductor package, TensorRT engine) on a recipe's validation set.

A checkpoint is evaluated by :func:`dino.engine.evaluate.evaluate_checkpoint` (distributed under accelerate launch).
An artifact is run by :class:`dino.predict.detector.Detector` (its backend, ``dino predict``'s letterboxing onto the
artifact's fixed canvas, its batch limit) on the same images, and its predictions are scored, printed and written by
the same code as a checkpoint's (:func:`dino.engine.evaluate.score` and ``report``). Every argument is checked
before anything is generated or loaded: a wrong file costs one line, not a generated dataset.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from dino.api_arguments import check_evaluate_arguments
from dino.config import Recipe
from dino.durable import make_output_dir
from dino.engine.evaluate import evaluate_checkpoint, report, score, validation_set
from dino.errors import UserError
from dino.model_loading import checkpoint_file
from dino.predict.artifacts import KINDS, artifact_kind
from dino.predict.detector import Detector
from dino.predict.recipe import detector_recipe

# Images read per step of an artifact's evaluation (the progress bar's step); they run in forward passes of
# train.eval_batch_size images (1 by default: an AOTInductor package does not record the batch sizes it takes) and at
# most the artifact's static batch (an artifact exported with batch 1 runs image by image). Padded to the artifact's
# canvas alone or in a batch, an image gets the same detections, so a dynamic-batch artifact may run more at once.
READ_AHEAD = 8


def artifact_suffix_kind(path: str | os.PathLike):
    """The :data:`dino.predict.artifacts.KINDS` row whose suffix ``path`` has, or None (a checkpoint)."""
    suffix = Path(path).suffix.lower()
    return next((kind for kind in KINDS if suffix in kind.suffixes), None)


def model_source(model: str | os.PathLike, kind: str | None = None) -> tuple[Path, str | None]:
    """``(path, kind)`` of what to evaluate, checked without loading anything: an artifact (``kind`` named, or
    recognised by its suffix; the file must exist) or a checkpoint (``kind`` None: ``model.safetensors``, an official
    ``.pth``, a run's or checkpoint's folder, whose ``model.safetensors`` is returned). UserError naming the file."""
    path = Path(model)
    found = artifact_kind(path, kind) if kind is not None else artifact_suffix_kind(path)
    if found is None:
        return checkpoint_file(path), None
    if not path.is_file():
        raise UserError(f"{found.what} {path} does not exist")
    return path, found.name


def evaluate(model: str | os.PathLike, recipe: Recipe | str | None = None, *, overrides: Sequence[str] = (),
             output_dir: str | os.PathLike | None = None, kind: str | None = None,
             threads: int | None = None) -> dict | None:
    """COCO AP of ``model`` on its recipe's validation set, as ``dino eval`` computes it (same code).

    ``model``: ``model.safetensors``, an official ``.pth``, a training run's or checkpoint's folder, or an exported
    artifact: ONNX graph (``.onnx``, ONNX Runtime on the CPU), OpenVINO IR (``.xml``, CPU, at its recorded precision),
    AOTInductor package (``.pt2``), TensorRT engine (``.engine``; CUDA). ``kind``: the artifact kind (``"onnx"``,
    ``"openvino"``, ``"aoti"``, ``"engine"``); None: from the suffix. An artifact runs on its fixed canvas, each image
    resized as for a checkpoint and padded at the bottom/right (``dino predict``'s pre-processing).
    ``recipe``: a :class:`dino.config.Recipe`, a recipe name or file; None: the one the checkpoint records (required
    for an artifact, which records its classes but not its dataset).
    ``overrides``: ``section.field=value`` (``--set``), e.g. ``["data.root=/data/coco"]``.
    ``output_dir``: where ``results.json``, ``predictions.json`` and ``pr_curves.png`` go (None: nothing written).
    ``threads``: inference threads of an OpenVINO IR (None: every core).
    Returns the metrics: ``"AP"``, ``"AP50"``, ``"AP75"``, ``"APs"``, ``"APm"``, ``"APl"``, ``"AR1"``, ``"AR10"``,
    ``"AR100"``, ``"ARs"``, ``"ARm"``, ``"ARl"`` (floats in [0, 1], pycocotools' 12 numbers), ``"per_category"``
    ``{name: AP}`` and ``"num_images"``; the 12-line table is printed too. Under several processes (``accelerate
    launch``) the main process gets the dict of a checkpoint and the others None.
    """
    check_evaluate_arguments(model, recipe, overrides, output_dir)  # one line naming a bad argument
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UserError(f"threads must be an integer >= 1 or None, got {threads!r}")
    path, kind = model_source(model, kind)
    if kind is not None and recipe is None:
        raise UserError(f"{path}: an exported artifact records its classes, not its dataset: give the recipe to "
                        "evaluate it on (--recipe NAME_OR_FILE, or recipe= in Python)")
    cfg = detector_recipe(recipe, path if kind is None else None, overrides)
    if output_dir is not None:
        make_output_dir(output_dir, "output_dir")
    return run_evaluation(cfg, path, kind, output_dir, threads)


def run_evaluation(cfg: Recipe, path: Path, kind: str | None, output_dir: str | os.PathLike | None,
                   threads: int | None = None) -> dict | None:
    """Evaluates the checked ``(path, kind)`` of :func:`model_source` with the recipe ``cfg`` (overrides applied)."""
    if kind is None:
        return evaluate_checkpoint(cfg, path, output_dir)
    return evaluate_artifact(cfg, path, kind, output_dir, threads)


def evaluate_artifact(cfg: Recipe, path: Path, kind: str, output_dir: str | os.PathLike | None = None,
                      threads: int | None = None) -> dict:
    """Loads the artifact ``path`` of ``kind`` (before the validation set is built or generated: a file its runtime
    cannot load costs no data), runs it on ``cfg``'s validation images in the stored orientation, as evaluation reads
    them, and scores, prints and writes its predictions as :func:`dino.engine.evaluate.evaluate_checkpoint` does."""
    if cfg.train.eval_batch_size < 1:
        raise UserError(f"train.eval_batch_size must be >= 1, got {cfg.train.eval_batch_size}")
    detector = Detector.load(path, cfg, kind=kind, threads=threads)
    dataset = validation_set(cfg)
    records = []
    with tqdm(total=len(dataset), desc="eval", unit="image", dynamic_ncols=True) as bar:
        for start in range(0, len(dataset), READ_AHEAD):
            indices = range(start, min(start + READ_AHEAD, len(dataset)))
            pictures = [dataset.load_image(i) for i in indices]
            # Every detection the artifact gives (the num_select it was exported with), as a checkpoint's
            # PostProcess keeps all of its num_select: no score threshold, no cap.
            results = detector.detect_pictures(pictures, 0.0, sys.maxsize, cfg.train.eval_batch_size)
            for i, result in zip(indices, results):
                if isinstance(result, UserError):
                    raise UserError(f"image {dataset.images_dir / dataset.image_info(i)['file_name']}: {result}")
                records.append({"image_id": dataset.image_ids[i], "scores": result.scores, "labels": result.labels,
                                "boxes": result.boxes})
            bar.update(len(indices))
    records.sort(key=lambda r: r["image_id"])
    stats = score(records, dataset, output_dir, pr_curves=True)
    canvas = detector.backend.input_size
    report(stats, detector.description + (f", {canvas[0]}x{canvas[1]} canvas," if canvas else ""), cfg, output_dir)
    return stats
