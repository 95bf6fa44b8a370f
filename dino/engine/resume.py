"""Resuming: which checkpoint, whether its recipe is the one asked for, and applying a changed recipe on request.

Each checkpoint's ``progress.json`` holds the resolved recipe it was trained with. Resuming with a recipe that
differs in anything but run control (output folder, logging, checkpoint cadence, ``max_steps``...) is refused with
the differing fields, unless ``--resume-anyway``: then the new values apply, the optimizer's learning rates and
weight decay and the LR schedule included, and the log lists what changed.
"""
from __future__ import annotations

import bisect
import logging
from collections import Counter
from pathlib import Path

from dino.config import OptimConfig, Recipe
from dino.engine.checkpoint import latest_checkpoint, read_progress
from dino.engine.setup import resolved_recipe
from dino.errors import UserError
from dino.untrusted import printable, quote, shorten

logger = logging.getLogger("dino.engine")

# Fields that say how a run is driven, not what is trained: they may change freely between a run and its resumption.
RUN_CONTROL = frozenset({
    "train.output_dir", "train.auto_resume", "train.max_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.log_every_steps", "train.eval_every_epochs", "train.tracker",
    "train.process_group_timeout_s", "train.skip_nonfinite_steps", "train.find_unused_parameters", "data.num_workers",
    "data.skip_unreadable",  # a run stopped by an unreadable image is resumed with it set
    "train.termination_signals",
})


def find_checkpoint(resume: str | None, output_dir: str | Path, auto_resume: bool) -> Path | None:
    """The checkpoint to continue from: ``--resume PATH``'s, else (with ``train.auto_resume``) the output folder's."""
    if resume:
        checkpoint = latest_checkpoint(resume)
        if checkpoint is None:
            raise UserError(f"--resume {resume}: no checkpoint found (expected {resume}/checkpoints/step_*)")
        return checkpoint
    return latest_checkpoint(output_dir) if auto_resume else None


class AlreadyFinished(UserError):
    """The checkpoint to resume has trained every epoch of the recipe: nothing is left to do."""


def check_unfinished(checkpoint: Path | None, output_dir: str | Path, epochs: int) -> None:
    """AlreadyFinished when ``checkpoint`` is the end of the last of ``epochs`` epochs, so that rerunning a finished
    command says so instead of loading it only to rewrite the same ``model.safetensors``."""
    if checkpoint is None:
        return
    progress = read_progress(checkpoint)
    if progress.get("batches_in_epoch") or progress["epoch"] < epochs:
        return
    raise AlreadyFinished(
        f"already finished: {output_dir}, epoch {progress['epoch']}/{epochs} ({checkpoint}); to train again use a new "
        "train.output_dir or --set train.auto_resume=false (starts over there, replacing its model.safetensors); to "
        "train longer raise optim.epochs and pass --resume-anyway"
    )


def recipe_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """``{field: (saved value, current value)}`` for every field that differs, run-control fields left out.

    A field the saved recipe lacks but now holds its default is no difference: the checkpoint predates the field,
    and its default is what that older code did (a new config field must not strand every run in progress)."""
    keys = (saved.keys() | current.keys()) - RUN_CONTROL
    missing = object()
    defaults = resolved_recipe(Recipe())
    return {k: (saved.get(k, missing), current.get(k, missing)) for k in sorted(keys)
            if saved.get(k, missing) != current.get(k, missing)
            and not (k not in saved and k in defaults and current.get(k, missing) == defaults[k])}


def format_differences(differences: dict[str, tuple], limit: int = 10) -> str:
    """``field: old -> new, ...`` of the first ``limit`` differences, each value quoted short (the saved recipe is
    read from a file: :func:`dino.untrusted.quote`), then how many more."""
    shown = [f"{shorten(printable(str(k)), 80)}: {_show(old)} -> {_show(new)}"
             for k, (old, new) in list(differences.items())[:limit]]
    more = len(differences) - limit
    return ", ".join(shown) + (f", and {more} more" if more > 0 else "")


def _show(value) -> str:
    return "(absent)" if type(value) is object else quote(value)


def check_recipe(checkpoint: Path, saved: dict | str | None, current: dict, resume_anyway: bool) -> dict[str, tuple]:
    """The differences between the checkpoint's recipe and ``current``; UserError if any and not ``resume_anyway``."""
    if not isinstance(saved, dict):  # checkpoints written before recipes were recorded
        logger.warning("%s records no resolved recipe; cannot check that it matches the current one", checkpoint)
        return {}
    differences = recipe_differences(saved, current)
    if differences and not resume_anyway:
        raise UserError(
            f"{checkpoint} was trained with a different recipe ({format_differences(differences)}); pass "
            "--resume-anyway to continue it with the new values, or start afresh in another train.output_dir "
            "(or with --set train.auto_resume=false)"
        )
    if differences:
        logger.warning("resuming %s with a changed recipe (--resume-anyway), new values apply: %s", checkpoint,
                       format_differences(differences))
    return differences


def apply_optim_config(optimizer, scheduler, cfg: OptimConfig) -> None:
    """Puts ``cfg``'s learning rates, weight decay and LR steps into a restored optimizer and MultiStepLR.

    The scheduler keeps its position (``last_epoch``); the current lr is recomputed from the new base lrs and steps.
    """
    milestones = Counter(cfg.lr_drop_epochs)
    drops = bisect.bisect_right(sorted(milestones.elements()), scheduler.last_epoch)
    for group in optimizer.param_groups:
        base = cfg.lr_backbone if group.get("name") == "backbone" else cfg.lr
        group["initial_lr"] = base
        group["weight_decay"] = cfg.weight_decay
        group["lr"] = base * cfg.lr_drop_factor**drops
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler.milestones, scheduler.gamma = milestones, cfg.lr_drop_factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def interrupted_message(output_dir: str | Path, resume_hint: str | None = None) -> str:
    """One line for a run stopped by Ctrl-C: where its last complete checkpoint is and how to continue from it.

    ``resume_hint``: how to resume (default: rerun the same command, train.auto_resume finds the checkpoint).
    """
    checkpoint = latest_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if checkpoint is None:
        return f"no checkpoint in {output_dir} yet, so rerunning starts from the beginning"
    progress = read_progress(checkpoint)
    where = (f"after epoch {progress['epoch']}" if not progress.get("batches_in_epoch")
             else f"epoch {progress['epoch'] + 1}, batch {progress['batches_in_epoch']}")
    return (f"last checkpoint: {checkpoint} (step {progress['global_step']}, {where}); "
            f"{resume_hint or 'rerun the same command to resume from it'}")
