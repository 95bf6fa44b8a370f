"""Boxes in logit space: inverse sigmoid and the two-stage encoder proposals (one anchor per encoder token)."""
from __future__ import annotations

import torch


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] (official DINO uses eps=1e-3, not Deformable-DETR's 1e-5)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def encoder_proposals(
    memory: torch.Tensor,
    padding_mask: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    base_size: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per encoder token: its cell centre, size ``base_size * 2**level``.

    Args:
        memory: (B, S, C) encoder output.
        padding_mask: (B, S) bool, True on padding tokens.
        spatial_shapes: L pairs (H_l, W_l); S = sum H_l * W_l.
        base_size: box width/height at level 0, relative to the valid (unpadded) image.
    Returns:
        memory (B, S, C) with padding and invalid-proposal tokens zeroed, and proposals (B, S, 4) cxcywh in logit
        space, +inf where the token is padding or the box is not inside (0.01, 0.99).
    """
    batch = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask_l = padding_mask[:, start : start + h * w].view(batch, h, w)
        valid_h = (~mask_l[:, :, 0]).sum(1)
        valid_w = (~mask_l[:, 0, :]).sum(1)
        # float32 grid on purpose: the official model builds its anchors in float32 even when the model runs in
        # float64, and parity with its numbers depends on the same rounding.
        gy, gx = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([gx, gy], -1)
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * base_size * (2.0**lvl)
        proposals.append(torch.cat([grid, wh], -1).view(batch, -1, 4))
        start += h * w
    out = torch.cat(proposals, 1)
    valid = ((out > 0.01) & (out < 0.99)).all(-1, keepdim=True)
    out = torch.log(out / (1 - out))
    out = out.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    out = out.masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    memory = memory.masked_fill(~valid, 0.0)
    return memory, out
