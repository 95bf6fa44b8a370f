"""Resumable training-state checkpoint folders, written atomically and durably (reading weights: dino.model_loading).

Layout of an output folder::

    model.safetensors            latest weights (model_ema.safetensors too when EMA is on)
    checkpoints/step_00001234/   a checkpoint: the files below
    log.jsonl                    one JSON line per epoch
    steps.jsonl                  one JSON line every train.log_every_steps steps (dino.engine.step_log)
    curves.png                   losses, lr and AP drawn from both (dino.plots.curves)

A checkpoint folder holds Accelerate's ``save_state`` files (``optimizer.bin``, ``random_states_<process>.pkl``,
``scaler.pt`` with fp16) and the project's own: ``progress.json``, ``model.safetensors`` (and
``model_ema.safetensors``), ``scheduler.json`` (and ``ema.json``). Nothing in it is ever unpickled freely: how each
file is read back is :mod:`dino.engine.restore`'s docstring.

A checkpoint is written as ``checkpoints/.tmp-step_...``, fsynced, and renamed into place, so a folder named
``step_*`` is always complete. Folders are never deleted in place: a folder being replaced is first renamed to
``.replaced-step_*`` (listed as a checkpoint while no ``step_*`` of that name exists, so a crash between the two
renames loses nothing), and one being pruned to ``.trash-step_*`` (never listed), then deleted. A crash at any point
leaves the previous checkpoint loadable; the next save removes what a crash left behind.
"""
from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dino.durable import fsync_path, fsync_tree, no_space_error, write_json
from dino import untrusted
from dino.errors import UserError
from dino.untrusted import Invalid, parse_json
from dino.weights import save_weights

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
SCHEDULER = "scheduler.json"  # the LR scheduler's state_dict as JSON (milestones as [[epoch, count], ...])
EMA_STATE = "ema.json"  # {"n_averaged": N}: the EMA's update count (its weights are model_ema.safetensors)
# step_<global step>, plus "_end" for the checkpoint taken at an epoch's end (after the LR scheduler's step).
_STEP_DIR = re.compile(r"^(\.replaced-)?step_(\d+)(_end)?$")
_TMP, _REPLACED, _TRASH = ".tmp-", ".replaced-", ".trash-"


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of an output folder, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir() if p.is_dir()}
    found = []
    for name in names:
        m = _STEP_DIR.match(name)
        # A ".replaced-" folder is the complete previous version of a step whose new version was not yet renamed in.
        if m and not (m.group(1) and name[len(_REPLACED):] in names):
            found.append(((int(m.group(2)), m.group(3) is not None), root / name))
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` itself when it is a checkpoint folder, else the newest checkpoint of the output folder ``path``."""
    path = Path(path)
    if (path / PROGRESS).is_file():
        return path
    found = checkpoint_dirs(path)
    return found[-1] if found else None


MAX_RECORD_BYTES = 2**20  # progress.json, scheduler.json, ema.json: a few kilobytes as written


def read_progress(checkpoint: str | os.PathLike) -> dict:
    """``progress.json`` of ``checkpoint``: where the run stands (``epoch``, ``batches_in_epoch``, ``global_step``,
    ``skipped_steps``, the epoch's running loss sums), its batch plan and its recipe; UserError (:func:`invalid_file`)
    when it cannot be read, is larger than :data:`MAX_RECORD_BYTES` or nests deeper than
    :data:`~dino.untrusted.MAX_DEPTH`, or a count is not one or contradicts another (:func:`check_progress`). The
    counts are checked against the run's own data when it resumes (:func:`dino.engine.one_epoch.train_one_epoch`)."""
    path = Path(checkpoint) / PROGRESS
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no {PROGRESS})")
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise Invalid(f"{path.stat().st_size:,} bytes, more than the {MAX_RECORD_BYTES:,} a progress record holds")
        progress = check_progress(parse_json(path.read_bytes(), MAX_RECORD_BYTES))
    except (OSError, Invalid) as err:
        raise invalid_file(checkpoint, PROGRESS, "progress record", str(err)) from None
    return progress


def check_progress(progress) -> dict:
    """``progress`` (a parsed ``progress.json``) with its counts checked: whole numbers, at most 2**53, and
    consistent (every finished epoch took a step, skipped steps and counted batches within their totals); Invalid
    naming the field otherwise."""
    progress = untrusted.obj(progress, "the record")
    for key in ("epoch", "batches_in_epoch", "global_step"):
        untrusted.count(progress.get(key), key)
    if progress["global_step"] < progress["epoch"]:
        raise Invalid(f"global_step {progress['global_step']} is below epoch {progress['epoch']} (every epoch takes "
                      "at least one step)")
    untrusted.count(progress.get("skipped_steps", 0), "skipped_steps", progress["global_step"])
    plan = progress.get("batch_plan")
    if plan is not None and (not isinstance(plan, list) or len(plan) != 2):
        raise Invalid(f"batch_plan is {untrusted.quote(plan)}, not [per-device batch, processes]")
    for i, name in enumerate(("per-device batch", "processes") if plan is not None else ()):
        untrusted.count(plan[i], f"batch_plan's {name}", 2**20, 1)
    counted = untrusted.count(progress.get("losses_counted", 0), "losses_counted", progress["batches_in_epoch"])
    sums = untrusted.obj(progress.get("loss_sums", {}), "loss_sums")
    if len(sums) > 64 or any(len(k) > 64 for k in sums):
        raise Invalid(f"loss_sums has {len(sums)} keys, not the weighted loss terms")
    for key, value in sums.items():
        untrusted.number(value, f"loss_sums[{untrusted.quote(key)}]")
    if counted == 0 and sums:
        raise Invalid("loss_sums without losses_counted")
    recipe = progress.get("recipe")
    if recipe is not None and not isinstance(recipe, dict):
        raise Invalid(f"recipe is {untrusted.quote(recipe)}, not an object of field -> value")
    return progress


def invalid_file(checkpoint: str | os.PathLike, name: str, what: str, reason: BaseException | str,
                 what_to_do: str | None = None) -> UserError:
    """The one line for a checkpoint file ``name`` that cannot be used: ``cannot resume from <checkpoint>: <name> is
    not a valid <what> (<reason>); <what to do>`` (default: an earlier checkpoint, or fine-tuning from its weights)."""
    if isinstance(reason, BaseException):
        reason = describe_error(reason)
    what_to_do = what_to_do or f"the file is damaged or was not written by dino: {ways_on(checkpoint, name)}"
    return UserError(f"cannot resume from {checkpoint}: {name} is not a valid {what} ({reason}); {what_to_do}")


def describe_error(err: BaseException) -> str:
    """``Type: first line`` of a reading error; for torch's refusal of a pickle, the line saying what it refused;
    the message alone for a broken rule of an untrusted file (:class:`~dino.untrusted.Invalid`)."""
    if isinstance(err, Invalid):
        return str(err)
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    line = next((s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith(boilerplate)), "")
    line = line.split(". Please")[0].rstrip(".")  # "... not an allowed global by default. Please use ..."
    return f"{type(err).__name__}: {line[:200]}" if line else type(err).__name__


def ways_on(checkpoint: str | os.PathLike, name: str) -> str:
    """How to go on when the file ``name`` of ``checkpoint`` is unusable: resume the checkpoint before it (if any),
    start a new run from its weights (unless those are the bad file), or start over."""
    checkpoint = Path(checkpoint)
    earlier = []
    if checkpoint.parent.name == CHECKPOINTS:
        found = checkpoint_dirs(checkpoint.parent.parent)
        earlier = found[:found.index(checkpoint)] if checkpoint in found else []
    options = [f"resume the checkpoint before it with --resume {earlier[-1]}"] if earlier else []
    if name != "model.safetensors" and (checkpoint / "model.safetensors").is_file():
        options.append(f"start a new run from its weights with --finetune-from {checkpoint / 'model.safetensors'}")
    options.append("start over in another train.output_dir")
    return ", or ".join(options)


def check_keep(keep: int) -> None:
    if not isinstance(keep, int) or keep < 1:
        raise UserError(f"train.keep_checkpoints must be an integer >= 1 (the newest N checkpoints are kept), got {keep!r}")


def save_training_state(
    accelerator,
    output_dir: str | os.PathLike,
    progress: dict,
    weights: dict[str, dict],
    keep: int = 2,
    epoch_end: bool = False,
    metadata: dict[str, str] | None = None,
    documents: dict[str, dict] | None = None,
) -> Path:
    """Saves the full training state of every process into ``checkpoints/step_<global_step>[_end]`` atomically.

    ``weights`` maps file names (``model.safetensors``...) to state dicts written next to the state, with the
    safetensors ``metadata``; ``documents`` maps file names (``scheduler.json``...) to objects written as JSON. All
    processes must call this (each saves its own RNG state). Older checkpoints beyond the newest ``keep`` (>= 1) are
    removed.
    """
    check_keep(keep)
    root = Path(output_dir) / CHECKPOINTS
    final = root / (f"step_{progress['global_step']:08d}" + ("_end" if epoch_end else ""))
    tmp = root / f"{_TMP}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _removed_on_failure(tmp, final):
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, state in weights.items():
                save_weights(state, tmp / name, metadata)
            for name, document in (documents or {}).items():
                write_json(document, tmp / name)
            write_json(progress, tmp / PROGRESS)
            install_checkpoint(tmp, final)
    if accelerator.is_main_process:
        for replaced in root.glob(f"{_REPLACED}*"):
            if (root / replaced.name.removeprefix(_REPLACED)).exists():  # left by a crash after its replacement
                _delete(replaced)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            _delete(old)
        for stale in [*root.glob(f"{_TMP}*"), *root.glob(f"{_TRASH}*")]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _removed_on_failure(tmp: Path, final: Path) -> Iterator[None]:
    """Deletes the half-written checkpoint ``tmp`` when its writing fails (it would keep a full disk full);
    a full disk or quota is a UserError naming the folder, anything else keeps its traceback."""
    try:
        yield
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        user_error = no_space_error(err, final, f" (the half-written {tmp.name} was removed)", "checkpoint ")
        if user_error is not None:
            raise user_error from None
        raise


def install_checkpoint(tmp: Path, final: Path) -> None:
    """Moves the complete folder ``tmp`` to ``final`` so that a crash between any two steps loses no checkpoint."""
    fsync_tree(tmp)
    replaced = final.with_name(f"{_REPLACED}{final.name}")
    if final.exists():  # only when a run re-saves a step it already saved (e.g. resumed at max_steps)
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        fsync_path(final.parent)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if replaced.exists():
        _delete(replaced)


def _delete(folder: Path) -> None:
    """Renames ``folder`` out of the checkpoint names (durably), then deletes it."""
    trash = folder.with_name(f"{_TRASH}{folder.name.removeprefix(_REPLACED)}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    fsync_path(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)
