"""Reading and writing model weights: safetensors written atomically, PyTorch ``.pth`` checkpoints read safely.

Shared by the converter (``dino convert-official``) and the training engine, so both give the same errors.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dino.durable import give_new_file_mode, replace_durably
from dino.errors import UserError


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes ``state_dict`` as safetensors, atomically and durably (temp file in the same folder, fsynced, renamed),
    with the permissions of any new file (0666 less the umask).

    Tensors are copied to CPU, contiguous and unshared: safetensors rejects tensors that share memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, tmp, metadata=metadata)
        give_new_file_mode(tmp)  # mkstemp made it 0600; the weights are a file like any other (0644 under umask 022)
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_pth_state_dict(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a ``.pth`` checkpoint: ``{"model": state_dict, ...}`` (official DINO) or a bare state dict.

    Loads with ``weights_only=True``, allowing the ``argparse.Namespace`` that official checkpoints pickle beside the
    weights; ``trust_checkpoint=True`` unpickles anything (only for files you trust).
    Raises UserError naming the file.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"no such checkpoint file: {path!r}")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (or, legacy, a pickle)
        raise UserError(f"{path!r} is not a PyTorch checkpoint (.pth): it is neither a zip archive nor a pickle; give "
                        "a .pth or .safetensors checkpoint")
    try:
        if trust_checkpoint:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling raises many types
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        if trust_checkpoint:  # the flag is already given: advising it again would send the user in a circle
            raise UserError(f"cannot load {path!r} with torch.load(weights_only=False): {reason} It is not a readable "
                            "PyTorch checkpoint (corrupt, truncated, or not written by torch.save).") from None
        raise UserError(f"cannot load {path!r} with torch.load(weights_only=True): {reason} If you trust the file, "
                         "convert it with `dino convert-official --trust-checkpoint`.") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"{path!r} is not a DINO checkpoint: expected a dict with a 'model' state dict "
                         "or a bare state dict of tensors")
    return ckpt
