"""Which implementation the deformable-attention seam traces to during export.

- the PyTorch path (``ms_deform_attn_pytorch``, GridSample): the standard ONNX graph, and AOTInductor on CPU;
- one opaque ``torch.ops.dino.ms_deform_attn`` call per attention: the TensorRT plugin graph (each call becomes one
  plugin node) and AOTInductor with the CUDA kernel.

:func:`custom_op_seam` forces the second on any device for the duration of an export.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

import dino.ops  # registers torch.ops.dino.ms_deform_attn


def custom_op_overloads() -> list[Callable]:
    """The op overloads a custom-op seam traces to (keys of the ONNX translation table)."""
    return [torch.ops.dino.ms_deform_attn.default]


@contextlib.contextmanager
def custom_op_seam() -> Iterator[None]:
    """Inside the block every ``dino.ops.ms_deform_attn`` call is one ``dino::ms_deform_attn`` op, on any device."""
    with dino.ops.force_custom_op():
        yield
