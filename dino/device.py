"""The ``--device`` of the commands that take one (``dino predict``, ``dino export aoti``, ``dino bench``), checked
before anything is loaded: a device this machine does not have is one UserError line, not a CUDA-init traceback."""
from __future__ import annotations

import torch

from dino.errors import UserError


def check_device(device: str, flag: str = "--device") -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1") as a torch.device; UserError when it is not a device or not present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {device!r} is not a device: use cpu or cuda (cuda:N for the N-th GPU)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                            f"False); use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise UserError(f"{flag} {device!r}: only cpu and cuda are supported")
    return dev
