"""Weights files (safetensors) and resumable training-state checkpoints, all written atomically.

Layout of an output folder::

    model.safetensors            latest weights (model_ema.safetensors too when EMA is on)
    checkpoints/step_00001234/   accelerator.save_state() + progress.json + model.safetensors
    log.jsonl                    one JSON line per epoch

A checkpoint folder is first written as ``checkpoints/.tmp-step_...`` and renamed into place, so a folder named
``step_*`` is always complete; a crash mid-write leaves only a temp folder, which the next save removes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file

from dino.weights import load_pth_state_dict, save_weights  # noqa: F401  (save_weights re-exported)

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
# step_<global step>, plus "_end" for the checkpoint taken at an epoch's end (after the LR scheduler's step).
_STEP_DIR = re.compile(r"^step_(\d+)(_end)?$")


def write_json(obj, path: str | os.PathLike) -> None:
    """Writes JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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
        from dino.convert import convert_official_state_dict

        return convert_official_state_dict(obj, _heads_as_in(obj, model_cfg))
    return obj


def _heads_as_in(state_dict: dict, model_cfg):
    """``model_cfg`` with the class-head and label-embedding sizes of the checkpoint, so a checkpoint for other classes
    converts and the caller's ``ignore_keys`` (fine-tuning) decide what is dropped."""
    import copy

    cfg = copy.deepcopy(model_cfg)
    for key, value in state_dict.items():
        if key.endswith("class_embed.0.weight"):
            cfg.num_classes = value.shape[0]
        elif key.endswith("label_enc.weight"):
            cfg.denoising.labelbook_size = value.shape[0] - 1
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


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of an output folder, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        ((int(m.group(1)), m.group(2) is not None), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` itself when it is a checkpoint folder, else the newest checkpoint of the output folder ``path``."""
    path = Path(path)
    if (path / PROGRESS).is_file():
        return path
    found = checkpoint_dirs(path)
    return found[-1] if found else None


def read_progress(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / PROGRESS
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no {PROGRESS})")
    return json.loads(path.read_text())


def save_training_state(
    accelerator, output_dir: str | os.PathLike, progress: dict, weights: dict[str, dict], keep: int = 2, epoch_end: bool = False
) -> Path:
    """Saves the full training state of every process into ``checkpoints/step_<global_step>[_end]`` atomically.

    ``weights`` maps file names (``model.safetensors``...) to state dicts written next to the state. All processes
    must call this (each saves its own RNG state). Older checkpoints beyond the newest ``keep`` are removed.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / (f"step_{progress['global_step']:08d}" + ("_end" if epoch_end else ""))
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, state in weights.items():
            save_weights(state, tmp / name)
        write_json(progress, tmp / PROGRESS)
        if final.exists():  # only when a run re-saves a step it already saved (e.g. resumed at max_steps)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
