"""The deployable form of a detector: a letterboxed batch and its padding mask in, detections out; how to build it.

This is the graph contract every exporter (ONNX standard and plugin, AOTInductor, TensorRT) traces
(``CONTRACTS.md`` item 4, ``docs/deployment.md``):

- inputs ``images (B, 3, H, W)`` float32 ImageNet-normalised, each image at the top-left of the H x W canvas, zero
  padding right/bottom; ``mask (B, H, W)`` bool, True on padding (what ``dino.data.pad_images`` makes for
  ``dino eval``);
- outputs ``boxes (B, K, 4)`` float32 xyxy in pixels of the network input (the valid region starts at (0, 0), so
  these are pixels of the resized image; multiply by original / resized size for the original image),
  ``scores (B, K)`` float32 sigmoid probabilities, descending, ``labels (B, K)`` int64; K = ``num_select``.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

import dino
from dino.config import ModelConfig, Recipe, apply_overrides
from dino.engine.recipe import load_recipe, recipe_path
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint, without_pretrained_backbone
from dino.models.levels import image_size_problem
from dino.postprocess import postprocess
from dino.presets import PRESETS, get_preset

# The detector's raw per-query outputs, named in every exported graph (intermediate values of the shipped graph),
# so a check can read them back and compare query by query: ``pred_logits (B, Q, C)``, ``pred_boxes (B, Q, 4)``
# cxcywh in [0, 1] of each image's valid region, and ``query_indices (B, Q)`` int64, the encoder tokens the queries
# were selected from (two-stage top-Q), so the reference can be run on the same selection when near-tied proposal
# scores were ranked differently.
QUERY_OUTPUT_NAMES = ("pred_logits", "pred_boxes", "query_indices")


@dataclasses.dataclass
class DeployOutputs:
    """Everything one deploy forward computes: the detections and the per-query outputs they were selected from."""

    boxes: Tensor  # (B, K, 4) xyxy pixels of the network input
    scores: Tensor  # (B, K) descending
    labels: Tensor  # (B, K) int64
    pred_logits: Tensor  # (B, Q, C) float32 (float64 from a float64 model)
    pred_boxes: Tensor  # (B, Q, 4) cxcywh in [0, 1] of the valid region, float32 (float64 from a float64 model)
    valid_sizes: Tensor  # (B, 2) float32 (height, width) of each image's valid region in pixels
    query_indices: Tensor | None = None  # (B, Q) int64 encoder tokens the queries were selected from, query order
    # (B, Q) float32 logits: each selected token's proposal score (its best class logit), the value top-Q ranked by
    proposal_scores: Tensor | None = None

    def detections(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.boxes, self.scores, self.labels


def valid_sizes(mask: Tensor) -> Tensor:
    """``mask (B, H, W)`` bool, True on padding, image at the top-left -> ``(B, 2)`` float32 (height, width) pixels."""
    height = (~mask[:, :, 0]).sum(1)
    width = (~mask[:, 0, :]).sum(1)
    return torch.stack((height, width), 1).to(torch.float32)


class DeployModel(nn.Module):
    """Wraps a DINO model with its post-processing for export (fixed top-k in the graph, no NMS, as evaluation).

    ``forward(images, mask)`` -> ``(boxes, scores, labels)`` as in the module docstring; :meth:`run` also returns the
    per-query outputs. With ``half``, the detector runs in float16 (images are cast inside) and the post-processing
    in float32.
    """

    def __init__(self, model: nn.Module, num_select: int = 300, half: bool = False):
        super().__init__()
        self.model = model.eval()
        self.num_select = int(num_select)
        self.half = bool(half)
        if self.half:
            self.model.half()

    def run(self, images: Tensor, mask: Tensor, query_indices: Tensor | None = None) -> DeployOutputs:
        """The detections and per-query outputs; ``query_indices (B, Q)``: run on this query selection instead of
        the model's own top-Q (to check a graph that ranked near-tied proposals differently)."""
        images = images.to(self.dtype)
        out = self.model(images, mask, query_indices=query_indices)
        # float16 outputs are widened for the post-processing; float64 (a check's truth) keeps its precision.
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        if self.half:
            logits, boxes = logits.float(), boxes.float()
        sizes = valid_sizes(mask)
        # Exactly dino eval's post-processing (dino.postprocess), scaled to the valid region instead of the
        # original image size.
        scores, labels, boxes_xyxy = postprocess(logits, boxes, sizes, self.num_select)
        proposal_scores = out["interm_outputs"]["pred_logits"].to(logits.dtype).max(-1)[0]
        return DeployOutputs(boxes_xyxy, scores, labels, logits, boxes, sizes, out["query_indices"], proposal_scores)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.run(images, mask).detections()

    @property
    def dtype(self) -> torch.dtype:
        """The detector's arithmetic: float32, float16 (``half``) or float64 (:meth:`float64_twin`)."""
        return next(self.model.parameters()).dtype

    def float32_twin(self) -> DeployModel:
        """A float32 copy: the same weights (float16-rounded when ``half``) computing in float32."""
        return DeployModel(copy.deepcopy(self.model).float(), self.num_select)

    def float64_twin(self) -> DeployModel:
        """A float64 copy of the same weights: the truth an export check measures float32 arithmetic against
        (``dino_export.check_reference``); its per-query outputs stay float64."""
        return DeployModel(copy.deepcopy(self.model).double(), self.num_select)


class WithQueryOutputs(nn.Module):
    """The graph exporters trace: ``(boxes, scores, labels, pred_logits, pred_boxes, query_indices)``; the last three
    are removed from the shipped graph's outputs but keep their names inside it (see ``QUERY_OUTPUT_NAMES``)."""

    def __init__(self, deploy: DeployModel):
        super().__init__()
        self.deploy = deploy

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        out = self.deploy.run(images, mask)
        return out.boxes, out.scores, out.labels, out.pred_logits, out.pred_boxes, out.query_indices


def check_image_size(image_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    """Validates an ``(H, W)`` export size in pixels (two positive numbers); raises UserError naming the bad value.
    Whether the model can take that size is :func:`check_canvas_fits`'s question."""
    if len(image_size) != 2:
        raise UserError(f"--image-size takes two numbers H W, got {list(image_size)}")
    height, width = (int(v) for v in image_size)
    for name, value in (("height", height), ("width", width)):
        if value <= 0:
            raise UserError(f"--image-size {name} must be positive, got {value}")
    return height, width


def check_canvas_fits(model: nn.Module, image_size: tuple[int, int]) -> None:
    """UserError when the DINO ``model`` cannot run on an ``(H, W)`` canvas: its own feature levels must give at
    least as many encoder tokens as it has queries (:func:`dino.models.levels.image_size_problem`)."""
    problem = image_size_problem(model, *image_size)
    if problem is not None:
        raise UserError(f"--image-size {image_size[0]} {image_size[1]}: {problem}")


def resolve_recipe(spec: str, overrides: list[str] | None = None) -> tuple[str, Recipe]:
    """The recipe ``spec`` names (name or file, see ``dino.engine.recipe``) or, failing that, a default Recipe
    around the preset of that name (so ``--set`` takes the same ``model.xxx=...`` paths either way).

    Returns (description, recipe). Raises UserError listing both recipes and presets when neither matches.
    """
    try:
        recipe_path(spec)
    except UserError as recipe_err:
        if spec not in PRESETS:
            raise UserError(f"{recipe_err}; presets: {', '.join(sorted(PRESETS))}") from None
        return f"preset {spec}", apply_overrides(Recipe(name=spec, model=get_preset(spec)), list(overrides or []))
    recipe = load_recipe(spec, overrides)
    return f"recipe {recipe.name}", recipe


def resolve_model_config(spec: str, overrides: list[str] | None = None) -> tuple[str, ModelConfig]:
    """The model config of :func:`resolve_recipe`; returns (description, config)."""
    desc, recipe = resolve_recipe(spec, overrides)
    return desc, recipe.model


def evaluation_canvas(spec: str, overrides: list[str] | None = None) -> tuple[tuple[int, int], str]:
    """The export canvas ``(H, W)`` in pixels that holds every image the recipe evaluates on: its shorter side
    ``data.val_scale``, its longer side ``data.val_max_size`` (landscape, as ``dino eval`` resizes), and a line
    saying where it came from. UserError when the recipe leaves the longer side unbounded."""
    desc, recipe = resolve_recipe(spec, overrides)
    data = recipe.data
    if data.val_max_size is None:
        raise UserError(f"{desc} has no data.val_max_size, so the images it evaluates on have no largest size: give "
                        f"--image-size H W")
    where = "the preset's default" if desc.startswith("preset") else f"{desc}'s"
    return (data.val_scale, data.val_max_size), (
        f"canvas {data.val_scale}x{data.val_max_size}: {where} evaluation size (data.val_scale {data.val_scale}, "
        f"data.val_max_size {data.val_max_size}); --image-size H W to change it")


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
    desc, cfg = resolve_model_config(spec, overrides)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    if checkpoint is not None:
        try:  # never downloads backbone weights: the checkpoint replaces them
            model = build_model_from_checkpoint(cfg, checkpoint)
        except UserError as err:
            raise UserError(f"checkpoint does not match {desc}: {err}") from None
        desc += f", weights {Path(checkpoint).name}"
    else:
        # Random weights (benchmarks): nothing to download either.
        model = dino.build_model(without_pretrained_backbone(cfg))
        desc += ", random weights (no checkpoint)"
    wrapped = DeployModel(model, num_select if num_select is not None else cfg.num_select, half=half)
    return wrapped.eval(), desc
