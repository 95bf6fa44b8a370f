"""``torch.library`` custom ops ``dino::ms_deform_attn`` and ``dino::ms_deform_attn_backward``.

Registered on import, on every machine: the default (any device) implementation is the PyTorch path; the CUDA and
CPU implementations are the compiled kernels when they build (the CPU one for float32 / float64), else the PyTorch
path again. Fake (meta) kernels make
the ops traceable by ``torch.compile(fullgraph=True)`` and ``torch.export``; the export code maps the op to a
TensorRT plugin node.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dino.ops.kernel import load_cpu_kernel, load_kernel
from dino.ops.ms_deform_attn import CPU_KERNEL_DTYPES, level_views, ms_deform_attn_pytorch

_BILINEAR, _ZEROS = 0, 0  # aten grid_sampler enums: interpolation_mode, padding_mode


def ms_deform_attn_backward_pytorch(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ms_deform_attn_pytorch` from the aten grid-sampler backward.

    Autograd does not record inside a custom op's implementation, so the chain rule is spelled out here.

    Args:
        grad_output: (B, Q, M * D).
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights: as the forward.
    Returns:
        grad_value (B, S, M, D), grad_sampling_locations (B, Q, M, L, P, 2), grad_attention_weights (B, Q, M, L, P).
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    dt = value.dtype
    loc = sampling_locations.to(dt)
    attn = attention_weights.to(dt)
    # (B, Q, M*D) -> (B*M, D, Q, 1)
    go = grad_output.to(dt).view(B, Q, M, D).permute(0, 2, 3, 1).reshape(B * M, D, Q, 1)
    # (B, Q, M, L, P) -> (B*M, 1, Q, L, P)
    weights = attn.transpose(1, 2).reshape(B * M, 1, Q, L, P)
    grad_values, grad_grids, grad_weights = [], [], []
    for lvl, (h, w), v, g in level_views(value, spatial_shapes, loc):
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M, D, Q, P)
        grad_weights.append((go * sampled).sum(1))  # (B*M, Q, P)
        grad_sampled = go * weights[..., lvl, :]
        gv, gg = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled, v, g, _BILINEAR, _ZEROS, False, [True, True]
        )
        # (B*M, D, H, W) -> (B, H*W, M, D)
        grad_values.append(gv.reshape(B, M, D, h * w).permute(0, 3, 1, 2))
        grad_grids.append(gg)  # (B*M, Q, P, 2)
    grad_value = torch.cat(grad_values, dim=1).contiguous()
    # d grid / d loc = 2; (L, B*M, Q, P, 2) -> (B, Q, M, L, P, 2)
    grad_loc = 2 * torch.stack(grad_grids).view(L, B, M, Q, P, 2).permute(1, 3, 2, 0, 4, 5).contiguous()
    grad_attn = torch.stack(grad_weights).view(L, B, M, Q, P).permute(1, 3, 2, 0, 4).contiguous()
    return grad_value, grad_loc.to(sampling_locations.dtype), grad_attn.to(attention_weights.dtype)


@torch.library.custom_op("dino::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention as one opaque op; see :func:`dino.ops.ms_deform_attn_pytorch`."""
    dt = value.dtype
    return ms_deform_attn_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations.to(dt), attention_weights.to(dt)
    )


def check_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Raises ValueError naming the argument whose shape or device does not fit the op's contract.

    Checked in Python before the kernel runs, so bad input is a clear error and never reaches the C++ checks (whose
    exception path crashed one torch/driver combination; see docs/benchmarks.md).
    """
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (B, S, M, D), got shape {tuple(value.shape)}")
    B, S, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2 or \
            sampling_locations.shape[0] != B or sampling_locations.shape[2] != M:
        raise ValueError(f"ms_deform_attn: sampling_locations must be (B={B}, Q, M={M}, L, P, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    L, P = sampling_locations.shape[3], sampling_locations.shape[4]
    expected = (B, sampling_locations.shape[1], M, L, P)
    if tuple(attention_weights.shape) != expected:
        raise ValueError(f"ms_deform_attn: attention_weights must be {expected}, got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be ({L}, 2) and level_start_index ({L},), got "
                         f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    devices = {t.device for t in (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(f"ms_deform_attn: all inputs must be on the same device, got {sorted(map(str, devices))}")


@ms_deform_attn_op.register_kernel("cuda")
def _forward_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    check_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ext = load_kernel()
    if ext is None:
        dt = value.dtype
        return ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations.to(dt), attention_weights.to(dt)
        )
    return ext.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_op.register_kernel("cpu")
def _forward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    check_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ext = load_cpu_kernel() if value.dtype in CPU_KERNEL_DTYPES else None
    if ext is None:
        dt = value.dtype
        return ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations.to(dt), attention_weights.to(dt)
        )
    return ext.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_op.register_fake
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, _, M, D = value.shape
    return value.new_empty((B, sampling_locations.shape[1], M * D))


@torch.library.custom_op("dino::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_value, grad_sampling_locations, grad_attention_weights) of ``dino::ms_deform_attn``."""
    return ms_deform_attn_backward_pytorch(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_backward_op.register_kernel("cuda")
def _backward_cuda(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    ext = load_kernel()
    if ext is None:
        return ms_deform_attn_backward_pytorch(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return tuple(
        ext.backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    )


@ms_deform_attn_backward_op.register_kernel("cpu")
def _backward_cpu(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    ext = load_cpu_kernel() if value.dtype in CPU_KERNEL_DTYPES else None
    if ext is None:
        return ms_deform_attn_backward_pytorch(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return tuple(
        ext.backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    )


@ms_deform_attn_backward_op.register_fake
def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_loc, grad_attn


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
