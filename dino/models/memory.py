"""The memory a DINO forward needs, estimated from its input canvas before anything is allocated, so that a size
that cannot fit (``--set data.val_scale=100000``, a canvas from metadata or ``--image-size``) is one line giving the
estimate and the machine's memory, not an out-of-memory traceback after minutes (or the machine swapping).

The estimate counts the activations alive at the peak of an inference forward (``torch.no_grad``), in float32:

- per pixel of the canvas: the input (3 values) and the backbone's stem (a 64-channel map at stride 2, twice: the
  convolution's and the normalisation's outputs, 32 values per input pixel);
- per encoder token (:func:`dino.models.levels.encoder_tokens`): the token's hidden state and its copies (queries with
  position, value projection, residual: 6 x ``hidden_dim``), the feed-forward layer (``dim_feedforward``), and the
  deformable attention's sampling offsets and weights and the values it samples (``nheads x levels x points x
  (3 + hidden_dim / nheads)``).

Calibration (ru_maxrss increase of one forward, batch 1, one thread, 2-core VM, 2026-12-08): dino_quickstart 512x512
174 MB (formula 183 MB), 1024x1024 487 MB (733 MB); dino_r50_4scale 512x512 249 MB (202 MB), 768x768 506 MB (455 MB).
The measured peaks are 0.66 to 1.23 times the formula, so the estimate is the formula times :data:`LOWER_BOUND`
(0.6): a lower bound, and a size is refused only when even that exceeds the memory of the device.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from dino.errors import UserError
from dino.models.levels import encoder_tokens, feature_strides

__all__ = ["LOWER_BOUND", "device_memory_bytes", "forward_bytes", "check_forward_fits", "check_resize_fits"]

LOWER_BOUND = 0.6  # the smallest measured peak / formula ratio (0.66), rounded down
_PIXEL_VALUES = 3 + 32  # input + the backbone stem's two stride-2 maps of 64 channels
_BYTES = 4  # float32


def forward_bytes(model: nn.Module, batch: int, height: int, width: int) -> int:
    """At least how many bytes one inference forward of the built DINO ``model`` takes on a ``batch`` of ``height`` x
    ``width`` pixel canvases (the module docstring's formula times :data:`LOWER_BOUND`)."""
    t = model.cfg.transformer
    per_token = (6 * t.hidden_dim + t.dim_feedforward
                 + t.nheads * t.num_feature_levels * t.enc_n_points * (3 + t.hidden_dim // t.nheads))
    tokens = encoder_tokens(feature_strides(model), height, width)
    values = batch * (_PIXEL_VALUES * height * width + per_token * tokens)
    return int(LOWER_BOUND * _BYTES * values)


def device_memory_bytes(device: str | torch.device) -> int | None:
    """The memory of ``device``: a CUDA GPU's total memory, else the machine's physical memory; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no refusal
        return None


def check_forward_fits(model: nn.Module, batch: int, height: int, width: int, device: str | torch.device,
                       where: str) -> None:
    """UserError (one line: ``where`` the size came from, the estimate and the memory, in GB) when one forward of
    ``model`` on ``batch`` x ``height`` x ``width`` cannot fit in ``device``'s memory (:func:`forward_bytes`)."""
    needed, available = forward_bytes(model, batch, height, width), device_memory_bytes(device)
    if available is not None and needed > available:
        kind = "GPU" if torch.device(device).type == "cuda" else "machine"
        raise UserError(f"{where}: a forward on a batch of {batch} x {height}x{width} px needs at least about "
                        f"{needed / 1e9:.1f} GB, more than this {kind}'s {available / 1e9:.1f} GB; choose a smaller "
                        "size")


def check_resize_fits(model: nn.Module, val_scale: int, val_max_size: int | None, batch: int,
                      device: str | torch.device) -> None:
    """UserError when the validation resize (``data.val_scale``, ``data.val_max_size``) cannot fit even a batch of
    square images (the smallest canvas of the common case: a side of ``min(val_scale, val_max_size)`` pixels) in
    ``device``'s memory (:func:`check_forward_fits`), before the first forward."""
    side = min(val_scale, val_max_size or val_scale)
    check_forward_fits(model, batch, side, side, device, f"data.val_scale {val_scale}, data.val_max_size "
                       f"{val_max_size} (a square image resized to {side}x{side} px)")
