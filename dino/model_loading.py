"""Reading weights from any supported file into a model: this project's safetensors or an official DINO ``.pth``.

Used by evaluation, export, prediction and training (fine-tuning), so all of them accept the same files and give the
same errors. File formats themselves (atomic safetensors writes, safe ``.pth`` reads) live in :mod:`dino.weights`.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file

from dino.convert import convert_official_state_dict
from dino.weights import load_pth_state_dict


def is_official_state_dict(state_dict: dict) -> bool:
    """Official DINO keys put the ResNet under ``backbone.0.body.`` and carry per-layer head copies."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    return any(k.startswith("backbone.0.") for k in keys) or any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)


def read_state_dict(path: str | os.PathLike, model_cfg=None) -> dict[str, torch.Tensor]:
    """Reads our safetensors weights, or an official DINO .pth (``{"model": state_dict, ...}``) converted in memory.

    ``model_cfg`` (a ModelConfig) tells the converter which architecture the official file is for.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = load_pth_state_dict(path)
    if is_official_state_dict(obj):
        if model_cfg is None:
            raise ValueError(f"{path} is an official DINO checkpoint; converting it needs the model config")
        return convert_official_state_dict(obj, _heads_as_in(obj, model_cfg))
    return obj


def _heads_as_in(state_dict: dict, model_cfg):
    """``model_cfg`` with the class-head, label-embedding and query-embedding sizes of the checkpoint, so a checkpoint
    for other classes (or query counts) converts and the caller's ``ignore_keys`` (fine-tuning) decide what is dropped."""
    cfg = copy.deepcopy(model_cfg)
    for key, value in state_dict.items():
        if key.endswith("class_embed.0.weight"):
            cfg.num_classes = value.shape[0]
        elif key.endswith("label_enc.weight"):
            cfg.denoising.labelbook_size = value.shape[0] - 1
        elif key.endswith("tgt_embed.weight"):
            cfg.transformer.num_queries = value.shape[0]
    return cfg


def load_weights(
    model: torch.nn.Module, path: str | os.PathLike, ignore_keys: Iterable[str] = (), strict: bool = True
) -> tuple[list[str], list[str]]:
    """Loads weights into ``model``, dropping keys that match any regex in ``ignore_keys`` (re.search).

    Fine-tuning on new classes uses the official ``--finetune_ignore label_enc.weight class_embed``.
    With ``strict``, keys missing from the file (other than ignored ones) or unknown to the model raise ValueError;
    a shape mismatch always raises ValueError naming the key. Returns (missing, unexpected) key lists.
    """
    patterns = [re.compile(p) for p in ignore_keys]
    state = read_state_dict(path, getattr(model, "cfg", None))
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in patterns)}
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)} "
                f"(add it to --ignore-keys to fine-tune with a different head)"
            )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(p.search(k) for p in patterns)]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not match the model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    return missing, unexpected
