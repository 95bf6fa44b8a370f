"""Resumable training-state checkpoint folders, written atomically (reading weights into a model: dino.model_loading).

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

from dino.weights import save_weights

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
