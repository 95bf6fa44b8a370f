"""``dino_export.export``: ``dino export onnx|aoti`` from Python, returning the path written.

The same steps as the commands (:mod:`dino_export.cli`): the model built from the checkpoint without downloading,
wrapped for deployment (:class:`dino_export.deploy_model.DeployModel`), exported with the class count and category
names recorded in the artifact, and checked against PyTorch before it is moved into place. It lives in
``dino_export`` because ``dino/`` never imports ``dino_export`` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dino.api_arguments import (check_bool, check_choice, check_device_argument, check_int, check_overrides,
                                check_path, check_recipe, check_size)
from dino.config import Recipe
from dino.device import check_device
from dino.durable import check_output_file
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint, checkpoint_file
from dino.models.memory import check_forward_fits
from dino.predict.recipe import detector_recipe
from dino_export.aoti import export_aoti
from dino_export.artifact_labels import model_labels
from dino_export.deploy_model import DeployModel, check_canvas_fits
from dino_export.onnx_export import export_onnx

FORMATS = {"onnx": "model.onnx", "aoti": "model.pt2"}  # format -> the command's default output
DEFORM_OPS = ("standard", "plugin")


def export(checkpoint: str | os.PathLike, format: str = "onnx", output: str | os.PathLike | None = None,
           recipe: Recipe | str | None = None, *, image_size: tuple[int, int] = (800, 1333),
           overrides: Sequence[str] = (), deform_op: str = "standard", dynamic_batch: bool = False,
           max_batch: int | None = None, fp16: bool = False, device: str = "cpu", verify: bool = True) -> Path:
    """Exports ``checkpoint`` and returns the path written (checked against PyTorch unless ``verify=False``).

    ``checkpoint``: ``model.safetensors``, an official ``.pth``, or a training run's or checkpoint's folder.
    ``format``: ``"onnx"`` (``dino export onnx``; ``deform_op`` ``"standard"`` or ``"plugin"``, ``fp16``) or
    ``"aoti"`` (``dino export aoti``, compiled for ``device``). ``output``: default ``model.onnx`` / ``model.pt2``.
    ``recipe``: a :class:`dino.config.Recipe`, a recipe name or file, a preset; None: the one the checkpoint records.
    ``image_size``: (H, W) canvas in pixels the artifact takes (images letterboxed into it, with the padding mask).
    ``dynamic_batch``: a symbolic batch axis up to ``max_batch`` (default 32 for ONNX, 16 for AOTInductor).
    UserError (one line) for a bad argument or file; an export whose check fails writes nothing.
    """
    check_choice(format, "format", tuple(FORMATS))
    checkpoint, output = check_path(checkpoint, "checkpoint"), check_path(output, "output", optional=True)
    recipe, overrides = check_recipe(recipe), check_overrides(overrides)
    size = check_size(image_size)
    check_choice(deform_op, "deform_op", DEFORM_OPS)
    dynamic_batch, fp16, verify = (check_bool(v, n) for v, n in ((dynamic_batch, "dynamic_batch"), (fp16, "fp16"),
                                                                  (verify, "verify")))
    max_batch = check_int(max_batch, "max_batch", optional=True)  # torch.export's batch Dim fails below 1
    device = check_device_argument(device) or "cpu"
    if fp16 and format != "onnx":
        raise UserError("fp16 goes with format='onnx'")
    if format == "aoti":
        check_device(device, "device")
    # No output replaces an input (the weights, however spelled: a run folder, a symlink, a relative path, ..) or
    # a file of another kind; an existing folder is refused here, before the export and its check.
    output = output if output is not None else Path(FORMATS[format])
    recipe_file = recipe if isinstance(recipe, str) and Path(recipe).is_file() else None
    read = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    check_output_file(output, "output", FORMATS[format], inputs=(read, recipe_file),
                      replaces=(Path(FORMATS[format]).suffix,))
    weights = checkpoint_file(checkpoint)
    cfg = detector_recipe(recipe, weights, overrides)
    model = DeployModel(build_model_from_checkpoint(cfg.model, weights), cfg.model.num_select,
                        half=fp16 and format == "onnx")
    check_canvas_fits(model.model, size)
    check_forward_fits(model.model, 1, *size, device if format == "aoti" else "cpu", f"image_size {size}")
    labels = model_labels(model.model.num_classes, weights)
    if format == "onnx":
        return export_onnx(model, output, size, deform_op, dynamic_batch, max_batch or 32, verify=verify,
                           labels=labels).path
    return export_aoti(model, output, size, torch.device(device), dynamic_batch, max_batch or 16, verify=verify,
                       labels=labels)[0]
