"""``dino predict``: run a checkpoint or an exported artifact on images, write predictions.json and pictures.

    dino predict --recipe quickstart --checkpoint outputs/quickstart/model.safetensors data/shapes/val
    dino predict --recipe dino_r50_4scale_12ep --onnx model.onnx --checkpoint model.safetensors photos/
    dino predict --recipe dino_r50_4scale_12ep --openvino model.xml photos/
    dino predict --recipe dino_r50_4scale_12ep --engine model.engine --plugin-lib libdino_trt_plugin.so --device cuda a.jpg

A thin layer over :class:`dino.predict.detector.Detector` (``dino.Detector``): the flags choose what
``Detector.load`` loads, :func:`dino.predict.files.predict_files` writes what it detects.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dino.config import add_override_argument
from dino.device import check_device
from dino.engine.recipe import RECIPE_RUNS_AS_PYTHON
from dino.errors import UserError
from dino.predict.detector import Detector
from dino.predict.files import predict_files
from dino.predict.paths import check_output_dir, check_spares_inputs, list_inputs
from dino.predict.recipe import load_recipe_or_preset
from dino.run_lock import run_lock

ARTIFACT_FLAGS = ("onnx", "openvino", "aoti", "engine")  # dino.predict.artifacts.KINDS, by name


def _detector(args: argparse.Namespace, recipe) -> Detector:
    """The model the flags name: ``--checkpoint`` alone (PyTorch), or one exported artifact (its ``--checkpoint``
    only for the recipe and category names); ``recipe``: the ``--recipe`` given, loaded, or None."""
    sources = [flag for flag in ARTIFACT_FLAGS if getattr(args, flag)]
    if len(sources) > 1:
        given = ", ".join("--" + s for s in sources)
        raise UserError(f"give one of {', '.join('--' + f for f in ARTIFACT_FLAGS)} (got {given})")
    if args.plugin_lib and sources != ["engine"]:
        raise UserError("--plugin-lib goes with --engine")
    if args.image_size and sources != ["aoti"]:
        raise UserError("--image-size goes with --aoti (ONNX graphs, OpenVINO IRs and engines record their size)")
    overrides = [] if args.recipe else args.overrides  # a recipe read from the checkpoint gets --set there
    if not sources:
        if not args.checkpoint:
            raise UserError("give the model: --checkpoint (PyTorch) or " + " / ".join("--" + f for f in ARTIFACT_FLAGS))
        return Detector.load(args.checkpoint, recipe, args.device, overrides=overrides)
    kind = sources[0]
    return Detector.load(getattr(args, kind), recipe, args.device, overrides=overrides, checkpoint=args.checkpoint,
                         kind=kind, plugin_libs=args.plugin_lib,
                         image_size=tuple(args.image_size) if args.image_size else None)


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
    check_device(args.device)
    # The recipe and its --set first, as in every command (a bad override is the same line everywhere).
    recipe = load_recipe_or_preset(args.recipe, args.overrides) if args.recipe else None
    files, folders = list_inputs(args.inputs)  # bad paths fail before the model is built
    check_output_dir(args.output, files, folders)
    recipe_file = args.recipe if args.recipe and Path(args.recipe).is_file() else None
    check_spares_inputs(args.output, files, (args.checkpoint, recipe_file, *args.plugin_lib,
                                             *(getattr(args, flag) for flag in ARTIFACT_FLAGS)))
    detector = _detector(args, recipe)
    print(f"dino predict: {len(files)} file(s), {detector.description} on {detector.device}; labels: "
          f"{detector.names.source}")
    with run_lock(args.output, "--output"):  # one dino predict writes a folder
        summary = predict_files(detector, files, args.output, args.batch_size, args.score_threshold,
                                args.max_detections, progress=bool(folders))
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
        description="Run a checkpoint (PyTorch) or an exported artifact (--onnx, --openvino, --aoti, --engine) on image "
        "files and folders with dino eval's pre- and post-processing. Writes OUTPUT/predictions.json (boxes xyxy in "
        "the original image's pixels, score, label, category id and name; format in README.md) and one picture per "
        "image. Images are read as a viewer shows them: EXIF orientation applied, 16-bit grayscale scaled to 8 bits, "
        "transparent pixels composited on white. Unreadable files and images the model cannot take (too elongated) "
        "are named and skipped, as are pictures that cannot be saved; the exit status is then 1. The output folder "
        "must not hold an input nor be inside an input folder. Images of the same resized size share a forward pass "
        "(up to --batch-size), so detections do not depend on the batch. Put --set after the inputs.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--recipe", help="recipe file or name (model and validation resize), or a preset; default: the "
                                    f"recipe the checkpoint records (training records it); {RECIPE_RUNS_AS_PYTHON}")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model.safetensors, an official .pth, or a training run's or checkpoint's folder (its "
                        "model.safetensors); with --onnx/--openvino/--aoti/--engine only its "
                        "recipe and category names (metadata) are read, when not given or recorded in the artifact")
    p.add_argument("--onnx", metavar="PATH", help="exported ONNX graph (standard deform op), run in ONNX Runtime")
    p.add_argument("--openvino", metavar="PATH", help="OpenVINO IR (model.xml) from dino export openvino, run on the "
                                                     "CPU at the precision recorded in it (--device is not used)")
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
