"""Reading weights from any supported file into a model: this project's safetensors or an official DINO ``.pth``.

Used by evaluation, export, prediction and training (fine-tuning), so all of them accept the same files and give the
same errors: a missing, truncated or corrupt file, or one that does not fit the model, is a
:class:`~dino.errors.UserError` naming the file. File formats themselves (atomic safetensors writes, safe ``.pth``
reads) live in :mod:`dino.weights`.

:func:`build_model_from_checkpoint` is the one way to build a model whose every weight comes from a file: it never
fetches pretrained backbone weights (the checkpoint replaces them all), so it works offline.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dino import convert, untrusted
from dino.config import ModelConfig
from dino.errors import UserError
from dino.models.dino import DINO, build_model
from dino.untrusted import Invalid
from dino.weights import load_pth_state_dict


def is_official_state_dict(state_dict: dict) -> bool:
    """Official DINO keys put the ResNet under ``backbone.0.body.`` and carry per-layer head copies."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    return any(k.startswith("backbone.0.") for k in keys) or any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    return path


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The weights file ``path`` names: the file itself, or the ``model.safetensors`` of a training run's folder
    (``outputs/quickstart``) or of one of its checkpoint folders (``checkpoints/step_..._end``), named on stderr.

    UserError when ``path`` does not exist, or is a folder without ``model.safetensors`` (naming the run's latest
    checkpoint folder when it has one: a run still training has no final weights yet).
    """
    path = Path(path)
    if not path.is_dir():
        return _existing_file(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        latest = sorted(p for p in path.glob("checkpoints/step_*") if (p / "model.safetensors").is_file())
        raise UserError(f"checkpoint {path} is a folder without model.safetensors (the weights of a finished run or of "
                        "one of its checkpoint folders)" + (f"; its latest checkpoint is {latest[-1]}" if latest else ""))
    print(f"checkpoint {path} is a folder: using {weights}", file=sys.stderr)
    return weights


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        # Truncated files, garbage headers and unreadable files all land here.
        raise UserError(f"checkpoint {path} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def read_state_dict(path: str | os.PathLike, model_cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Reads our safetensors weights, or an official DINO .pth (``{"model": state_dict, ...}``) converted in memory.

    ``model_cfg`` tells the converter which architecture the official file is for. Raises UserError naming the file
    when it is missing, corrupt, truncated or not a DINO checkpoint.
    """
    path = _existing_file(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = load_pth_state_dict(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    if is_official_state_dict(obj):
        if model_cfg is None:
            raise UserError(f"{path} is an official DINO checkpoint; converting it needs the model config")
        try:
            return convert.convert_official_state_dict(obj, _heads_as_in(obj, model_cfg))
        except UserError:
            raise
        except ValueError as err:  # the converter names the key that does not fit
            raise UserError(f"{path}: {err}") from None
    return obj


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a checkpoint (``{}`` for a ``.pth`` or a file written without any).

    Training stores ``"categories"`` (JSON list of ``{"id", "name"}``) and ``"recipe"`` there.
    """
    path = _existing_file(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise UserError(f"checkpoint {path} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def read_categories(path: str | os.PathLike) -> list[dict] | None:
    """The dataset categories ``[{"id": 1, "name": "person"}, ...]`` stored with a checkpoint, or None.

    UserError naming the file and the entry when they break :func:`dino.untrusted.categories`' rules (size, nesting,
    types, id range, name length)."""
    text = read_metadata(path).get("categories")
    if text is None:
        return None
    try:
        return untrusted.categories(untrusted.parse_json(text), "metadata 'categories'")
    except Invalid as err:
        raise UserError(f"checkpoint {path}: metadata 'categories' is not a JSON list of {{id, name}} ({err})") from None


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
    model: torch.nn.Module, path: str | os.PathLike, ignore_keys: Iterable[str] = (), strict: bool = True,
    hint: str = "",
) -> tuple[list[str], list[str]]:
    """Loads weights into ``model``, dropping keys that match any regex in ``ignore_keys`` (re.search).

    Fine-tuning on new classes uses the official ``--finetune_ignore label_enc.weight class_embed``.
    A shape mismatch, and with ``strict`` keys missing from the file (other than ignored ones) or unknown to the
    model, raise one UserError line counting each kind with a few examples, saying which recipe the file was trained
    with when it records it, and ending with ``hint`` (what the calling command offers; by default: the recipe).
    Returns (missing, unexpected) key lists.
    """
    patterns = [re.compile(p) for p in ignore_keys]
    state = read_state_dict(path, getattr(model, "cfg", None))
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in patterns)}
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not any(p.search(k) for p in patterns)]
    unexpected = [k for k in state if k not in own]
    if mismatched or (strict and (missing or unexpected)):
        raise UserError(_mismatch_message(path, state, own, mismatched, missing if strict else [],
                                          unexpected if strict else [], getattr(model, "cfg", None), hint))
    model.load_state_dict(state, strict=False)
    return missing, unexpected


def _mismatch_message(path, state, own, mismatched, missing, unexpected, model_cfg, hint: str) -> str:
    def examples(keys: list[str], show=str) -> str:
        return ", ".join(show(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")

    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape ("
                     + examples(mismatched, lambda k: f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}") + ")")
    if missing:
        parts.append(f"{len(missing)} missing from the file ({examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unknown to the model ({examples(unexpected)})")
    return (f"checkpoint {path} does not fit this recipe's model: {len(own)} tensors expected, "
            + "; ".join(parts) + _trained_with(path, model_cfg) + "; "
            + (hint or "give the --recipe (and --set values) it was trained with"))


def _trained_with(path, model_cfg) -> str:
    """``"; it was trained with recipe 'x' (model.a: 1 there, 2 here, ...)"`` from its metadata, or ``""``."""
    try:
        recipe = untrusted.parse_json(read_metadata(path).get("recipe") or "null")
    except (UserError, Invalid):
        return ""
    if not isinstance(recipe, dict):
        return ""
    current = {f"model.{k}": v for k, v in _flat(json.loads(json.dumps(asdict(model_cfg), default=str))).items()} \
        if model_cfg is not None else {}
    # None there: a value filled in at run time (num_classes from the data), not a difference of the recipe.
    differ = [k for k in current if recipe.get(k) is not None and recipe[k] != current[k]
              and k != "model.backbone.pretrained"]
    shown = ", ".join(f"{k}: {untrusted.quote(recipe[k])} there, {current[k]!r} here"  # k: a field of this version
                      for k in differ[:3])
    return f"; it was trained with recipe {untrusted.quote(recipe.get('name', '?'))}" + (f" ({shown}{', ...' if len(differ) > 3 else ''})"
                                                                        if differ else "")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "timm_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def without_pretrained_backbone(model_cfg: ModelConfig) -> ModelConfig:
    """A copy of ``model_cfg`` whose backbone starts from random weights (``backbone.pretrained = None``)."""
    cfg = copy.deepcopy(model_cfg)
    cfg.backbone.pretrained = None
    return cfg


def build_model_from_checkpoint(model_cfg: ModelConfig, path: str | os.PathLike) -> DINO:
    """The model of ``model_cfg`` with every weight read (strictly) from ``path``, in eval mode on the CPU.

    The backbone is built without its pretrained weights whatever ``backbone.pretrained`` says (the checkpoint
    replaces every one of them), so loading a checkpoint never downloads. The file is checked before the model is
    built, so a missing file fails at once. Raises UserError naming the file when it is missing, corrupt or does not
    match the model.
    """
    _existing_file(path)
    model = build_model(without_pretrained_backbone(model_cfg))
    load_weights(model, path, strict=True)
    return model.eval()
