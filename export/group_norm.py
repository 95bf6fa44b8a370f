"""GroupNorm as exported graphs compute it well in float32: mean and variance reduced one axis at a time.

PyTorch's GroupNorm exports to ONNX as ``InstanceNormalization`` over ``(B, groups, -1)``. ONNX Runtime's float32
kernel sums each group in one long reduction, so its rounding grows with the number of cells it sums, where PyTorch
sums in a cascade. On the trained quickstart model at 800x1333 (16,700 cells x 4 channels per group at stride 8)
the first input projection came out of ONNX Runtime 4.5e-4 from float64, where PyTorch float32 is 2.1e-6 (200x), and
every later layer inherited it: the per-query score 5e-4 that failed the export check (docs/deployment.md "Export
checks"). A two-pass mean/variance written with one ``ReduceMean`` over the group is no better (the same long sum).
Reducing one axis at a time (width, then height, then the group's channels) keeps every sum short (at most
max(H, W, C / groups) terms), so the float32 statistics are as accurate as PyTorch's.

The eager model keeps ``nn.GroupNorm`` (it is the model's definition and its fast path); only tracing for an exported
graph sees :class:`StagedGroupNorm`, through :func:`staged_group_norms`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _staged_mean(x: torch.Tensor, first_axis: int) -> torch.Tensor:
    """Mean over axes ``first_axis..-1`` of ``x``, one axis at a time from the last (keepdim)."""
    for axis in range(x.dim() - 1, first_axis - 1, -1):
        x = x.mean(axis, keepdim=True)
    return x


class StagedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with its statistics reduced one axis at a time (same parameters; the same result in exact
    arithmetic, and in float32 as close to it as PyTorch's). ``x: (B, C, *)`` -> same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, groups, C / groups, *spatial): every reduction below runs over one of the last axes.
        groups = x.reshape(x.shape[0], self.num_groups, -1, *x.shape[2:])
        centred = groups - _staged_mean(groups, 2)
        variance = _staged_mean(centred * centred, 2)
        out = (centred * torch.rsqrt(variance + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


@contextlib.contextmanager
def staged_group_norms(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.GroupNorm`` of ``model`` computes as :class:`StagedGroupNorm` (the same module
    objects and parameters, so the graph's weight names do not change); restored on exit."""
    swapped = [m for m in model.modules() if type(m) is nn.GroupNorm]
    for module in swapped:
        module.__class__ = StagedGroupNorm
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.GroupNorm
