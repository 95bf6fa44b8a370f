"""The feature levels a DINO model reads an image at, and the smallest image they allow.

The encoder's tokens are the cells of every level: ``ceil(H / s) x ceil(W / s)`` at stride ``s``. Every stride-2
stage of the backbones (ResNet stem and stages, Swin patch embedding and merging) and each extra stride-2
convolution pads, so a side of n pixels gives ``ceil(n / s)`` cells at stride ``s`` (``tests/test_user_errors_sweep.py`` checks
this against the feature maps of odd sizes). Two-stage query selection keeps the top ``num_queries`` tokens, so an
image (or an export canvas) must give at least that many: that, not a fixed pixel size, is the model's limit.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["encoder_tokens", "feature_strides", "image_size_problem", "smallest_square_side"]


def feature_strides(model: nn.Module) -> list[int]:
    """Strides in pixels of a built DINO ``model``'s levels: the backbone's, then one doubling per extra level."""
    strides = [int(s) for s in model.backbone.strides]
    while len(strides) < model.num_feature_levels:
        strides.append(strides[-1] * 2)
    return strides


def encoder_tokens(strides: list[int], height: int, width: int) -> int:
    """Encoder tokens of a ``height`` x ``width`` pixel input: the cells of every level."""
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)


def smallest_square_side(strides: list[int], num_queries: int) -> int:
    """The smallest side n in pixels such that an n x n input gives at least ``num_queries`` tokens."""
    side = 1
    while encoder_tokens(strides, side, side) < num_queries:
        side += 1
    return side


def image_size_problem(model: nn.Module, height: int, width: int) -> str | None:
    """Why ``model`` (a built DINO) cannot take a ``height`` x ``width`` input, or None: too few encoder tokens for
    its queries. The message names the strides, the token count, ``transformer.num_queries`` and a size that works."""
    strides = feature_strides(model)
    tokens = encoder_tokens(strides, height, width)
    if tokens >= model.num_queries:
        return None
    side = smallest_square_side(strides, model.num_queries)
    return (f"{height}x{width} px gives the model's feature levels (strides {', '.join(map(str, strides))}) "
            f"{tokens} encoder tokens, fewer than its {model.num_queries} queries (model.transformer.num_queries), "
            f"which are chosen among them; the model needs at least {side}x{side} px or another size giving "
            f"{model.num_queries} tokens")
