"""The deployable form of a detector: images in, post-processed detections out, and how to build it from files."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from dino.config import ModelConfig
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint
from dino.postprocess import postprocess

# The feature pyramid's coarsest level has stride 64 (the extra stride-2 convolution after C5): a smaller image leaves
# it without a single cell.
MIN_IMAGE_SIDE = 64


class DeployModel(nn.Module):
    """Wraps a DINO model with its post-processing for export: no padding mask, fixed top-k in the graph.

    ``forward(images)`` with ``images (B, 3, H, W)`` ImageNet-normalised returns ``boxes (B, K, 4)`` xyxy in pixels of
    the input size, ``scores (B, K)`` sigmoid probabilities (descending), ``labels (B, K)`` int64, K = ``num_select``.
    With ``half``, the detector runs in float16 (images are cast inside) and the post-processing in float32.
    """

    def __init__(self, model: nn.Module, num_select: int = 300, half: bool = False):
        super().__init__()
        self.model = model.eval()
        self.num_select = int(num_select)
        self.half = bool(half)
        if self.half:
            self.model.half()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, _, height, width = images.shape
        # All-False mask: exported inputs are whole images, never padded batches.
        mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        if self.half:
            images = images.half()
        out = self.model(images, mask)
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        sizes = torch.tensor([[height, width]], dtype=torch.float32, device=images.device).expand(batch, 2)
        scores, labels, boxes_xyxy = postprocess(logits, boxes, sizes, self.num_select)
        return boxes_xyxy, scores, labels


def check_image_size(image_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    """Validates an ``(H, W)`` export size in pixels; raises UserError naming the bad value."""
    if len(image_size) != 2:
        raise UserError(f"--image-size takes two numbers H W, got {list(image_size)}")
    height, width = (int(v) for v in image_size)
    for name, value in (("height", height), ("width", width)):
        if value <= 0:
            raise UserError(f"--image-size {name} must be positive, got {value}")
        if value < MIN_IMAGE_SIDE:
            raise UserError(
                f"--image-size {name} {value} is below {MIN_IMAGE_SIDE} px: the stride-64 feature level would be empty"
            )
    return height, width


def resolve_model_config(spec: str, overrides: list[str] | None = None) -> tuple[str, ModelConfig]:
    """The model config of a recipe (name or file, see ``dino.engine.recipe``) or, failing that, of a preset name.

    Returns (description, config). Raises UserError listing both recipes and presets when neither matches.
    """
    from dino.config import Recipe, apply_overrides
    from dino.engine.recipe import load_recipe, recipe_path
    from dino.presets import PRESETS, get_preset

    try:
        recipe_path(spec)
    except UserError as recipe_err:
        if spec not in PRESETS:
            raise UserError(f"{recipe_err}; presets: {', '.join(sorted(PRESETS))}") from None
        # A preset is the model of a default Recipe, so --set takes the same model.xxx=... paths as with a recipe.
        return f"preset {spec}", apply_overrides(Recipe(name=spec, model=get_preset(spec)), list(overrides or [])).model
    recipe = load_recipe(spec, overrides)
    return f"recipe {recipe.name}", recipe.model


def build_deploy_model(
    spec: str,
    checkpoint: str | Path | None,
    num_select: int | None = None,
    half: bool = False,
    overrides: list[str] | None = None,
) -> tuple[DeployModel, str]:
    """Builds the model of recipe/preset ``spec``, loads ``checkpoint`` (strict) and wraps it for export.

    ``checkpoint=None`` keeps random weights (for benchmarks). Returns (model in eval mode on CPU, description).
    Raises UserError naming the file when it is missing, corrupt or does not match the model.
    """
    import dino

    desc, cfg = resolve_model_config(spec, overrides)
    cfg = dataclasses.replace(cfg)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    if checkpoint is not None:
        try:  # never downloads backbone weights: the checkpoint replaces them
            model = build_model_from_checkpoint(cfg, checkpoint)
        except UserError as err:
            raise UserError(f"checkpoint does not match {desc}: {err}") from None
        desc += f", weights {Path(checkpoint).name}"
    else:
        model = dino.build_model(cfg)
        desc += ", random weights (no checkpoint)"
    wrapped = DeployModel(model, num_select if num_select is not None else cfg.num_select, half=half)
    return wrapped.eval(), desc
