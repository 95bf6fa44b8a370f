"""The deployable form of a detector: images in, post-processed detections out, and how to build it from files."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from dino.config import ModelConfig
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
    """Validates an ``(H, W)`` export size in pixels; raises ValueError naming the bad value."""
    if len(image_size) != 2:
        raise ValueError(f"--image-size takes two numbers H W, got {list(image_size)}")
    height, width = (int(v) for v in image_size)
    for name, value in (("height", height), ("width", width)):
        if value <= 0:
            raise ValueError(f"--image-size {name} must be positive, got {value}")
        if value < MIN_IMAGE_SIDE:
            raise ValueError(
                f"--image-size {name} {value} is below {MIN_IMAGE_SIDE} px: the stride-64 feature level would be empty"
            )
    return height, width


def resolve_model_config(spec: str, overrides: list[str] | None = None) -> tuple[str, ModelConfig]:
    """The model config of a recipe (name or file, see ``dino.engine.recipe``) or, failing that, of a preset name.

    Returns (description, config). Raises FileNotFoundError listing both recipes and presets when neither matches.
    """
    from dino.engine.recipe import available_recipes, load_recipe, recipe_path
    from dino.errors import UserError

    try:
        recipe_path(spec)
    except UserError as recipe_err:
        from dino.presets import PRESETS, get_preset

        if spec in PRESETS:
            cfg = get_preset(spec)
            if overrides:
                from dino.config import apply_overrides

                # Overrides are written against a Recipe (model.xxx=...); a preset is a ModelConfig.
                apply_overrides(cfg, [o[len("model."):] if o.startswith("model.") else o for o in overrides])
            return f"preset {spec}", cfg
        raise FileNotFoundError(
            f"{recipe_err}; presets: {', '.join(sorted(PRESETS))}"
        ) from None
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
    Raises FileNotFoundError for a missing file and ValueError naming the keys when the checkpoint does not match.
    """
    import dino
    from dino.model_loading import load_weights

    desc, cfg = resolve_model_config(spec, overrides)
    cfg = dataclasses.replace(cfg)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    model = dino.build_model(cfg)
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint)
        except ValueError as err:
            raise ValueError(f"checkpoint does not match {desc}: {err}") from None
        desc += f", weights {Path(checkpoint).name}"
    else:
        desc += ", random weights (no checkpoint)"
    wrapped = DeployModel(model, num_select if num_select is not None else cfg.num_select, half=half)
    return wrapped.eval(), desc
