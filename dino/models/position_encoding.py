"""Sine position embeddings: per-pixel for feature maps and per-box for decoder queries."""
from __future__ import annotations

import math

import torch
from torch import nn


def _sine_cos(embed: torch.Tensor, dim_t: torch.Tensor) -> torch.Tensor:
    """(..., ) positions -> (..., F): sin on even, cos on odd frequencies, interleaved."""
    x = embed[..., None] / dim_t
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    # float32 even for float64 models, as the official code does (parity depends on the same rounding).
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_feats)


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine embedding of a padded feature map (DETR; DINO uses temperature 20 on both axes).

    ``forward(mask)`` with ``mask (B, H, W)`` bool (True on padding) returns ``(B, 2 * num_pos_feats, H, W)``
    float32, y features first, coordinates normalised to (0, 2*pi] over the valid region.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 20.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos = torch.cat((_sine_cos(y_embed, dim_t), _sine_cos(x_embed, dim_t)), dim=3)
        return pos.permute(0, 3, 1, 2)


def sine_embed_boxes(boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of query anchors (the decoder's positional query before ``ref_point_head``).

    Args:
        boxes: (B, Q, 2 or 4) cxcywh in [0, 1].
        num_feats: features per coordinate (hidden_dim // 2).
    Returns:
        (B, Q, num_feats * boxes.shape[-1]) in the official order y, x, w, h (y before x).
    """
    scale = 2 * math.pi
    dim_t = _frequencies(num_feats, temperature, boxes.device)
    parts = [_sine_cos(boxes[..., i] * scale, dim_t) for i in range(boxes.shape[-1])]
    if boxes.shape[-1] == 2:
        return torch.cat((parts[1], parts[0]), dim=-1)
    if boxes.shape[-1] == 4:
        return torch.cat((parts[1], parts[0], parts[2], parts[3]), dim=-1)
    raise ValueError(f"sine_embed_boxes: boxes must end in 2 or 4 coordinates, got shape {tuple(boxes.shape)}")
