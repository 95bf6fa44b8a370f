"""The multi-scale deformable attention core op.

``ms_deform_attn`` is the only place the model touches the sampling: the CUDA kernel (``csrc/``) plugs in here
for CUDA tensors when it is built, the CPU kernel (``csrc/cpu``) for float32 / float64 CPU tensors when it is built;
everywhere else the pure-PyTorch path below computes the same function.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from dino.ops.kernel import cpu_kernel_state, kernel_available, kernel_state, load_cpu_kernel

logger = logging.getLogger("dino.ops")

CPU_KERNEL_DTYPES = (torch.float32, torch.float64)  # the CPU kernel's; others (bf16 autocast) take the PyTorch path


def level_views(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor):
    """Yields, per level, ``(lvl, (H, W), value (B*M, D, H, W), grid (B*M, Q, P, 2) in [-1, 1])`` for grid_sample."""
    B, S, M, D = value.shape
    # Python ints: split sizes stay static under tracing and export.
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        yield lvl, (h, w), v, g


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
    sampled = [F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
               for _, _, v, g in level_views(value, spatial_shapes, sampling_locations)]
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

    Dispatches to the custom op ``dino::ms_deform_attn`` for CUDA tensors when the CUDA kernel is built and for
    float32 / float64 CPU tensors when the CPU kernel is built, to the PyTorch path otherwise; inside
    :func:`use_custom_op` always to the custom op, inside :func:`use_pytorch_path` always to the PyTorch path, on any
    device (the innermost block decides).
    """
    forced = _forced_paths[-1] if _forced_paths else None
    if forced == "custom_op" or (forced is None and _kernel_usable(value)):
        if not torch.compiler.is_compiling():
            _log_path_once("custom op dino::ms_deform_attn" + _kernel_label(value))
        return torch.ops.dino.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if not torch.compiler.is_compiling():
        _log_path_once("PyTorch path (grid_sample)")
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


_forced_paths: list[str] = []  # "custom_op" / "pytorch" of the open use_custom_op / use_pytorch_path blocks
_logged_paths: set[str] = set()


@contextlib.contextmanager
def _force(path: str) -> Iterator[None]:
    _forced_paths.append(path)
    try:
        yield
    finally:
        _forced_paths.pop()


def use_custom_op() -> contextlib.AbstractContextManager[None]:
    """Inside the block, :func:`ms_deform_attn` always calls ``torch.ops.dino.ms_deform_attn`` on any device.

    For export: the traced graph then holds one opaque ``dino::ms_deform_attn`` node per attention (which the ONNX
    exporter maps to a TensorRT plugin node) instead of the grid_sample decomposition.
    """
    return _force("custom_op")


def use_pytorch_path() -> contextlib.AbstractContextManager[None]:
    """Inside the block, :func:`ms_deform_attn` always runs the PyTorch path (grid_sample), even on CUDA tensors
    with the kernel built: for an exported graph that must not depend on this project's op (ONNX standard graph,
    an AOTInductor package that loads without ``dino.ops``)."""
    return _force("pytorch")


def path_name(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The path :func:`ms_deform_attn` takes for a ``value`` on ``device`` of ``dtype`` (no forcing block open):
    ``"CUDA kernel"``, ``"CPU kernel"`` or ``"PyTorch (grid_sample)"``, for benchmark rows that name what ran.
    Builds the kernel if it is not built yet."""
    probe = torch.empty(0, device=device, dtype=dtype)
    if not _kernel_usable(probe):
        return "PyTorch (grid_sample)"
    return "CUDA kernel" if probe.is_cuda else "CPU kernel"


def _kernel_usable(value: torch.Tensor) -> bool:
    if value.is_cuda:
        return _cuda_kernel_usable()
    if value.device.type == "cpu" and value.dtype in CPU_KERNEL_DTYPES:
        return _cpu_kernel_usable()
    return False


def _kernel_label(value: torch.Tensor) -> str:
    if value.is_cuda:
        return " (CUDA kernel)"
    if value.device.type == "cpu" and value.dtype in CPU_KERNEL_DTYPES and cpu_kernel_state():
        return " (CPU kernel)"
    return ""


def _cpu_kernel_usable() -> bool:
    if torch.compiler.is_compiling():
        # No build while tracing; an unknown state routes to the op, whose CPU implementation falls back by itself.
        state = cpu_kernel_state()
        return True if state is None else state
    return load_cpu_kernel() is not None


def _cuda_kernel_usable() -> bool:
    if torch.compiler.is_compiling():
        # No build while tracing; an unknown state routes to the op, whose CUDA kernel falls back by itself.
        state = kernel_state()
        return True if state is None else state
    return kernel_available()


def _log_path_once(path: str) -> None:
    if path not in _logged_paths:
        _logged_paths.add(path)
        logger.info("ms_deform_attn uses the %s", path)
