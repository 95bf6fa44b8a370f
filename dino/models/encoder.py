"""Deformable transformer encoder: multi-scale deformable self-attention over all feature-map tokens."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dino.models.deformable_attention import MSDeformAttn


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 2048, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: (B, S, C); reference_points: (B, S, L, 2); padding_mask: (B, S). Returns (B, S, C)."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel-centre reference point of every token, normalised by the valid region then rescaled per level.

    Args:
        spatial_shapes: L pairs (H_l, W_l).
        valid_ratios: (B, L, 2) float32 (w, h) fraction of each level map that is not padding.
    Returns:
        (B, S, L, 2) float32 (x, y) in each level's [0, 1] coordinates.
    """
    device = valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # float32 like the official code, whatever the model dtype (parity depends on it).
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    ref = torch.cat(points, 1)
    return ref[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` (no final norm: DINO is post-norm)."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes, shapes_tensor, level_start_index, valid_ratios, padding_mask):
        """src, pos: (B, S, C); valid_ratios: (B, L, 2); padding_mask: (B, S) bool. Returns memory (B, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, shapes_tensor, level_start_index, padding_mask)
        return out
