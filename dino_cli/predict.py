"""``dino predict``: run a checkpoint or an exported artifact on images, write predictions.json and pictures.

    dino predict --recipe quickstart --checkpoint outputs/quickstart/model.safetensors data/shapes/val
    dino predict --recipe dino_r50_4scale_12ep --onnx model.onnx --checkpoint model.safetensors photos/
    dino predict --recipe dino_r50_4scale_12ep --engine model.engine --plugin-lib libdino_trt_plugin.so --device cuda a.jpg

Chooses the backend (PyTorch from a checkpoint, or ``dino_export.predict_backends``); the pipeline is :mod:`dino.predict.files`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dino.config import Recipe, add_override_argument, apply_overrides
from dino.device import check_device
from dino.engine.recipe import load_recipe, recipe_path
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint, read_categories
from dino.predict.backend import ModelBackend
from dino.predict.files import predict_files
from dino.predict.paths import check_output_dir, list_inputs
from dino.predict.labels import LabelNames
from dino.presets import PRESETS, get_preset
from dino.run_lock import run_lock
from dino_export.predict_backends import AotiBackend, OnnxRuntimeBackend, TensorRTBackend


def load_recipe_or_preset(spec: str, overrides: list[str]) -> Recipe:
    """The recipe ``spec`` (file or name), or a preset name as the model of a default Recipe; ``--set`` applied."""
    try:
        recipe_path(spec)
    except UserError as err:
        if spec not in PRESETS:
            raise UserError(f"{err}; presets: {', '.join(sorted(PRESETS))}") from None
        return apply_overrides(Recipe(name=spec, model=get_preset(spec)), list(overrides))
    return load_recipe(spec, overrides)


def _backend(args: argparse.Namespace, cfg: Recipe):
    sources = [flag for flag in ("onnx", "aoti", "engine") if getattr(args, flag)]
    if len(sources) > 1:
        raise UserError(f"give one of --onnx, --aoti, --engine (got {', '.join('--' + s for s in sources)})")
    if args.plugin_lib and sources != ["engine"]:
        raise UserError("--plugin-lib goes with --engine")
    if args.image_size and sources != ["aoti"]:
        raise UserError("--image-size goes with --aoti (ONNX graphs and engines record their size)")
    if not sources:
        if not args.checkpoint:
            raise UserError("give the model: --checkpoint (PyTorch) or --onnx / --aoti / --engine")
        model = build_model_from_checkpoint(cfg.model, args.checkpoint)
        return ModelBackend(model, cfg.model.num_select, args.device), f"{cfg.name}, weights {args.checkpoint}"
    if sources == ["onnx"]:
        return OnnxRuntimeBackend(args.onnx, args.device), f"{cfg.name}, ONNX graph {args.onnx}"
    if sources == ["aoti"]:
        return AotiBackend(args.aoti, args.image_size, args.device), f"{cfg.name}, AOTInductor package {args.aoti}"
    return TensorRTBackend(args.engine, args.plugin_lib, args.device), f"{cfg.name}, TensorRT engine {args.engine}"


def _label_names(args: argparse.Namespace, cfg: Recipe, backend, artifact: str | None) -> LabelNames:
    """Names of the model's labels: an exported artifact's own classes when it records them (refusing a recipe of
    another class count), else the checkpoint's categories, else COCO's or numbers by the recipe's class count."""
    categories = read_categories(args.checkpoint) if args.checkpoint else None
    recorded = getattr(backend, "labels", None)
    if recorded is None:
        names = LabelNames.build(cfg.model.num_classes, categories)
        if artifact is not None:
            names.source += (f" (by --recipe {cfg.name}: {artifact} records no classes, re-export it to have them "
                             "checked)")
        return names
    if recorded.num_classes != cfg.model.num_classes:
        raise UserError(f"{artifact} was exported for {recorded.num_classes} classes but --recipe {cfg.name} has "
                        f"model.num_classes={cfg.model.num_classes}: give the recipe the model was exported from")
    names = LabelNames.build(recorded.num_classes, recorded.categories or categories)
    if recorded.categories:
        names.source = f"{len(recorded.categories)} category names recorded in {artifact}"
    return names


def _summary_line(summary) -> str | None:
    """One line naming every file skipped and every picture not saved, or None when there is none."""
    parts = []
    if summary.failed:
        parts.append(f"{len(summary.failed)} file(s) skipped: " + ", ".join(f["file"] for f in summary.failed))
    if summary.pictures_not_saved:
        parts.append(f"{len(summary.pictures_not_saved)} picture(s) not saved (detections written): "
                     + ", ".join(r["file"] for r in summary.pictures_not_saved))
    return "dino predict: error: " + "; ".join(parts) if parts else None


def run_predict(args: argparse.Namespace) -> int:
    cfg = load_recipe_or_preset(args.recipe, args.overrides)
    check_device(args.device)
    files, folders = list_inputs(args.inputs)  # bad paths fail before the model is built
    check_output_dir(args.output, files, folders)
    backend, description = _backend(args, cfg)
    artifact = args.onnx or args.aoti or args.engine
    names = _label_names(args, cfg, backend, artifact)
    print(f"dino predict: {len(files)} file(s), {description} on {backend.device}; labels: {names.source}")
    with run_lock(args.output, "--output"):  # one dino predict writes a folder
        summary = predict_files(backend, files, cfg.data, names, args.output, args.batch_size, args.score_threshold,
                                args.max_detections, progress=bool(folders), description=description)
    count = sum(len(r["detections"]) for r in summary.images)
    pictures = len(summary.images) - len(summary.pictures_not_saved)
    print(f"wrote {summary.json_path} ({len(summary.images)} image(s), {count} detections) and {pictures} "
          f"picture(s) in {args.output}")
    line = _summary_line(summary)
    if line:
        print(line, file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    """Adds ``predict`` to the ``dino`` command."""
    p = subparsers.add_parser(
        "predict", help="detect objects in images; writes predictions.json and pictures with the boxes drawn",
        description="Run a checkpoint (PyTorch) or an exported artifact (--onnx, --aoti, --engine) on image files and "
        "folders with dino eval's pre- and post-processing. Writes OUTPUT/predictions.json (boxes xyxy in the original "
        "image's pixels, score, label, category id and name; format in README.md) and one picture per image. "
        "Images are read as a viewer shows them: EXIF orientation applied, 16-bit grayscale scaled to 8 bits, "
        "transparent pixels composited on white. Unreadable files and images the model cannot take (too elongated) "
        "are named and skipped, as are pictures that cannot be saved; the exit status is then 1. The output folder "
        "must not hold an input nor be inside an input folder. Images of the same resized size share a forward pass "
        "(up to --batch-size), so detections do not depend on the batch. Put --set after the inputs.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--recipe", required=True, help="recipe file or name (model and validation resize), or a preset")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model.safetensors or an official .pth; with --onnx/--aoti/--engine only its category names "
                        "(metadata) are read, when the artifact records none")
    p.add_argument("--onnx", metavar="PATH", help="exported ONNX graph (standard deform op), run in ONNX Runtime")
    p.add_argument("--aoti", metavar="PATH", help="AOTInductor package (.pt2) from dino export aoti")
    p.add_argument("--engine", metavar="PATH", help="TensorRT engine from dino export trt (CUDA)")
    p.add_argument("--plugin-lib", action="append", default=[], metavar="PATH",
                   help="with --engine: TensorRT plugin library (libdino_trt_plugin.so) of a plugin graph")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                   help="with --aoti: the package's input size, for packages that do not record it")
    p.add_argument("--output", default="outputs/predict", metavar="DIR",
                   help="folder for predictions.json and the pictures (default: outputs/predict); refused when it "
                        "holds an input or is inside an input folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=1, help="images read together (default 1); those of the same size share a forward pass")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections scoring at least this (0.3)")
    p.add_argument("--max-detections", type=int, default=100, help="at most this many detections per image (100)")
    add_override_argument(p)
    p.set_defaults(func=run_predict)
