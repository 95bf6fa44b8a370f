"""Multi-scale deformable attention (Deformable DETR), the module around the ``dino.ops.ms_deform_attn`` seam."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dino.ops


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and level around its reference point.

    Parameter names match the official ``MSDeformAttn`` (sampling_offsets, attention_weights, value_proj,
    output_proj).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Initial offsets fan out radially, one direction per head, growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, C) queries with their positional embedding added.
            reference_points: (B, Q, L, 2) points (x, y) or (B, Q, L, 4) boxes cxcywh, in [0, 1] of each level
                map (padding included).
            value: (B, S, C) flattened multi-level features, S = sum H_l * W_l.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64 start of each level in S.
            padding_mask: (B, S) bool, True on padding (those values are zeroed).
        Returns:
            (B, Q, C).
        """
        B, Q, _ = query.shape
        S = value.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, M, L * P), -1).view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the box size: at most half the box away for the n_points-th point.
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"MSDeformAttn: reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}"
            )
        # Coordinates are float32 (float64 in a float64 model); a model cast to float16 samples at float16 locations.
        # The parameters' dtype, not the activations': under autocast the weights stay float32 and so do locations.
        locations = locations.to(self.value_proj.weight.dtype)
        out = dino.ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)
