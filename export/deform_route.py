"""Which implementation the deformable-attention seam traces to during export.

- the PyTorch path (``ms_deform_attn_pytorch``, GridSample): the standard ONNX graph, and AOTInductor on CPU;
- one opaque custom-op call per attention (``torch.ops.dino.ms_deform_attn`` when dino.ops registers it): the
  TensorRT plugin graph (each call becomes one plugin node) and AOTInductor with the CUDA kernel.

:func:`custom_op_seam` forces the second on any device for the duration of an export.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch

import dino.ops
from dino.ops.ms_deform_attn import ms_deform_attn_pytorch

# Fallback op for trees where dino.ops has no custom op yet: same schema as dino::ms_deform_attn.
_FALLBACK_QUALNAME = "dino_export::ms_deform_attn"
_fallback_op = None


def _ensure_fallback_op():
    global _fallback_op
    if _fallback_op is None:

        @torch.library.custom_op(_FALLBACK_QUALNAME, mutates_args=())
        def _op(
            value: torch.Tensor,
            spatial_shapes: torch.Tensor,
            level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor,
            attention_weights: torch.Tensor,
        ) -> torch.Tensor:
            return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

        @_op.register_fake
        def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
            batch, _, heads, channels = value.shape
            return value.new_empty(batch, sampling_locations.shape[1], heads * channels)

        _fallback_op = torch.ops.dino_export.ms_deform_attn
    return _fallback_op


def custom_op() -> torch._ops.OpOverloadPacket:
    """The custom op the seam is routed through: ``torch.ops.dino.ms_deform_attn`` when registered, else a fallback."""
    try:
        return torch.ops.dino.ms_deform_attn
    except (AttributeError, RuntimeError):
        return _ensure_fallback_op()


def custom_op_overloads() -> list[Callable]:
    """Every op overload a custom-op seam may trace to (keys of the ONNX translation table)."""
    ops = [_ensure_fallback_op().default]
    try:
        ops.append(torch.ops.dino.ms_deform_attn.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


@contextlib.contextmanager
def custom_op_seam() -> Iterator[None]:
    """Routes every ``dino.ops.ms_deform_attn`` call through one custom-op call, on any device, inside the block.

    Uses the switch of ``dino.ops`` when it offers one; otherwise rebinds the seam function wherever the model's
    modules imported it.
    """
    force = getattr(dino.ops, "force_custom_op", None)
    if callable(force):
        with force():
            yield
        return
    op = custom_op()
    # The package re-exports the function under the submodule's name, so fetch the submodule itself.
    original = sys.modules["dino.ops.ms_deform_attn"].ms_deform_attn

    def routed(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    patched = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "dino" or name.startswith("dino.")):
            continue
        for attr in ("ms_deform_attn",):
            if getattr(module, attr, None) is original:
                setattr(module, attr, routed)
                patched.append((module, attr))
    try:
        yield
    finally:
        for module, attr in patched:
            setattr(module, attr, original)
