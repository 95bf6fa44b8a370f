"""Restoring a run from a checkpoint folder, reading every file as data: nothing in the folder is ever executed.

A checkpoint folder (:mod:`dino.engine.checkpoint`) may come from someone else (a shared cluster folder, an archive),
so each file is read by a reader that cannot run code:

=========================  ====================================  ===============================================
file                       holds                                 read with
=========================  ====================================  ===============================================
progress.json              position, batch plan, recipe          json
model.safetensors          the model's weights                   safetensors
model_ema.safetensors      the EMA's weights (train.ema)         safetensors
ema.json                   the EMA's update count (train.ema)    json
scheduler.json             the LR scheduler's state              json, keys and types checked against MultiStepLR
optimizer.bin              the optimizer's state (Accelerate)    torch.load(weights_only=True)
random_states_<i>.pkl      process i's RNG states (Accelerate)   torch.load(weights_only=True), numpy's ndarray
                                                                 and dtype allowed (:data:`RNG_GLOBALS`)
scaler.pt                  fp16's gradient scaler (Accelerate)   torch.load(weights_only=True)
=========================  ====================================  ===============================================

Checkpoints written before ``scheduler.json`` existed hold the scheduler and the EMA in Accelerate's
``custom_checkpoint_0.pkl`` / ``custom_checkpoint_1.pkl`` (which Accelerate's ``load_state`` unpickles without
restriction); they are read with ``torch.load(weights_only=True)`` instead. No other file of the folder is read
(``sampler.bin``, ``dl_state_dict.bin``: the training loader keeps no state there).

Every file is read and checked before anything is changed, and every process reads every file (the RNG files of the
other processes too), so a file that cannot be used stops every process alike, with the one line of
:func:`~dino.engine.checkpoint.invalid_file`. The RNG states are part of an exact resume: unreadable ones stop the
resume unless ``--resume-anyway``, and then the log says that they were not restored.
"""
from __future__ import annotations

import logging
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SCALER_NAME
from safetensors.torch import load_file

from dino.config import Recipe
from dino.engine.batching import BatchPlan
from dino.engine.checkpoint import (EMA_STATE, MAX_RECORD_BYTES, SCHEDULER, invalid_file, read_progress,
                                   ways_on)
from dino.engine.checkpointer import Progress
from dino.engine.resume import apply_optim_config
from dino.errors import UserError
from dino.untrusted import MAX_COUNT, Invalid, parse_json, quote

logger = logging.getLogger("dino.engine")

MODEL, EMA_WEIGHTS = "model.safetensors", "model_ema.safetensors"
OPTIMIZER = f"{OPTIMIZER_NAME}.bin"
LEGACY_SCHEDULER, LEGACY_EMA = "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"  # before scheduler.json
# What Accelerate's RNG file pickles besides tensors and plain values: numpy's MT19937 state array.
RNG_GLOBALS = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def rng_file(process: int) -> str:
    return f"{RNG_STATE_NAME}_{process}.pkl"


@dataclass
class _State:
    """Everything read from a checkpoint, checked, not yet applied."""

    model: dict
    optimizer: dict
    scheduler: dict
    ema: tuple[dict, int] | None = None
    scaler: dict | None = None
    rng: dict | None = None


def restore(accelerator, checkpoint: Path, plan: BatchPlan, model, optimizer, scheduler, ema, cfg: Recipe,
            differences: dict, resume_anyway: bool) -> Progress:
    """Loads the full training state of ``checkpoint``; a changed recipe (``differences``, accepted) then applies.

    UserError (one line naming the file) when a file cannot be read or does not fit, before anything is changed.
    """
    saved = read_progress(checkpoint)
    progress = Progress.from_dict(saved)
    if progress.batches_in_epoch and saved.get("batch_plan") != [plan.per_device, plan.num_processes]:
        raise UserError(
            f"{checkpoint} stopped mid-epoch with per-device batch x processes = {saved.get('batch_plan')}; "
            f"resume it with the same number of processes (now {plan.per_device} x {plan.num_processes})"
        )
    net = accelerator.unwrap_model(model)
    state = _State(
        model=_weights(checkpoint, MODEL, "model weights file", net),
        optimizer=_optimizer_state(checkpoint, optimizer),
        scheduler=_scheduler_state(checkpoint, scheduler),
        ema=None if ema is None else _ema_state(checkpoint, ema, "train.ema" in differences),
        scaler=None if accelerator.scaler is None else _scaler_state(checkpoint, "train.mixed_precision" in differences),
        rng=_rng_states(accelerator, checkpoint, saved, resume_anyway),
    )
    _check_counts(checkpoint, progress, state)
    _apply(accelerator, checkpoint, state, net, optimizer, scheduler, ema)
    if any(k.startswith("optim.") for k in differences):
        apply_optim_config(optimizer, scheduler, cfg.optim)
    logger.info("resumed from %s: epoch %d, batch %d, step %d", checkpoint, progress.epoch + 1,
                progress.batches_in_epoch, progress.global_step)
    return progress


def _check_counts(checkpoint: Path, progress: Progress, state: _State) -> None:
    """The counts of scheduler.json and ema.json against progress.json's: the LR scheduler steps once per finished
    epoch, the EMA at most once per optimizer step."""
    last_epoch = state.scheduler.get("last_epoch")
    if type(last_epoch) is int and not 0 <= last_epoch <= progress.epoch:
        raise invalid_file(checkpoint, SCHEDULER, "LR scheduler state",
                           f"last_epoch {quote(last_epoch)} is not within the {progress.epoch} epoch(s) progress.json "
                           "says are done")
    if state.ema is not None and state.ema[1] > progress.global_step:
        raise invalid_file(checkpoint, EMA_STATE, "EMA state", f"n_averaged {quote(state.ema[1])} is more than the "
                           f"{progress.global_step} optimizer steps progress.json says were taken")


def _apply(accelerator, checkpoint: Path, state: _State, net, optimizer, scheduler, ema) -> None:
    net.load_state_dict(state.model)
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:  # groups or parameters that do not match
        raise invalid_file(checkpoint, OPTIMIZER, "optimizer state for this model", err) from None
    scheduler.load_state_dict(state.scheduler)
    if ema is not None and state.ema is not None:
        weights, n_averaged = state.ema
        ema.module.load_state_dict(weights)
        ema.n_averaged.fill_(n_averaged)
    if state.scaler is not None:
        accelerator.scaler.load_state_dict(state.scaler)
    if state.rng is not None:
        _set_rng_states(state.rng)


def _read(checkpoint: Path, name: str, what: str, reader, what_to_do: str | None = None):
    path = checkpoint / name
    if not path.is_file():
        raise invalid_file(checkpoint, name, what, "no such file", what_to_do)
    try:
        return reader(path)
    except Exception as err:  # every reader raises its own types for a damaged or foreign file
        raise invalid_file(checkpoint, name, what, err, what_to_do) from None


def _torch_data(path: Path, allowed=()):
    """``torch.load`` that refuses every global but tensors, plain containers and ``allowed``: a pickle that would run
    code (``__reduce__``) is an error, never executed."""
    with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its note on a pickle protocol it did not write: the error says enough
        return torch.load(path, map_location="cpu", weights_only=True)


def _json(path: Path):
    """A JSON record of the checkpoint, within :data:`~dino.engine.checkpoint.MAX_RECORD_BYTES` (checked before
    reading) and :data:`~dino.untrusted.MAX_DEPTH`."""
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise Invalid(f"{path.stat().st_size:,} bytes, more than the {MAX_RECORD_BYTES:,} such a record holds")
    return parse_json(path.read_bytes(), MAX_RECORD_BYTES)


def _weights(checkpoint: Path, name: str, what: str, module: torch.nn.Module) -> dict:
    """A safetensors state dict that fits ``module`` exactly (names and shapes)."""
    weights = _read(checkpoint, name, what, lambda p: load_file(str(p)))
    problem = _misfit(weights, module.state_dict())
    if problem:
        raise invalid_file(checkpoint, name, what, f"does not fit the recipe's model: {problem}")
    return weights


def _misfit(state: dict, reference: dict) -> str | None:
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    shapes = [k for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
    for keys, what in ((missing, "missing"), (extra, "unexpected"), (shapes, "of another shape")):
        if keys:
            return f"{len(keys)} tensor(s) {what}, e.g. {keys[0]}"
    return None


def _optimizer_state(checkpoint: Path, optimizer) -> dict:
    """optimizer.bin, with as many parameter groups and parameters in each as ``optimizer`` has."""
    state = _read(checkpoint, OPTIMIZER, "optimizer state", _torch_data)
    if not isinstance(state, dict) or not {"state", "param_groups"} <= state.keys():
        raise invalid_file(checkpoint, OPTIMIZER, "optimizer state", "not an optimizer state_dict")
    try:
        sizes = [len(group["params"]) for group in state["param_groups"]]
    except (TypeError, KeyError) as err:
        raise invalid_file(checkpoint, OPTIMIZER, "optimizer state", err) from None
    expected = [len(group["params"]) for group in optimizer.param_groups]
    if sizes != expected:
        raise invalid_file(checkpoint, OPTIMIZER, "optimizer state",
                           f"parameter groups of {sizes} parameters, the recipe's model has {expected}")
    return state


def _scheduler_state(checkpoint: Path, scheduler) -> dict:
    """scheduler.json (or an older checkpoint's custom_checkpoint_0.pkl) as MultiStepLR's state_dict, its keys and
    value types checked: ``load_state_dict`` would set any key as an attribute of the scheduler."""
    legacy = not (checkpoint / SCHEDULER).exists() and (checkpoint / LEGACY_SCHEDULER).exists()
    name = LEGACY_SCHEDULER if legacy else SCHEDULER
    state = _read(checkpoint, name, "LR scheduler state", _torch_data if legacy else _json)
    try:
        return _checked_scheduler_state(state, scheduler.state_dict())
    except (ValueError, TypeError) as err:
        raise invalid_file(checkpoint, name, "LR scheduler state", err) from None


def _checked_scheduler_state(state, reference: dict) -> dict:
    if not isinstance(state, dict):
        raise ValueError(f"a {type(state).__name__}, not an object")
    unknown = sorted(set(state) - set(reference))
    if unknown:
        raise ValueError(f"unknown key {quote(unknown[0])}")
    state = dict(state)
    milestones = state.get("milestones", {})
    pairs = milestones.items() if isinstance(milestones, dict) else milestones
    state["milestones"] = Counter({_count(epoch): _count(count) for epoch, count in pairs})
    for key, value in state.items():
        expected = reference[key]
        if key == "milestones" or expected is None:
            continue
        if isinstance(expected, bool) or isinstance(expected, str):
            ok = type(value) is type(expected)
        elif isinstance(expected, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(expected, list):
            ok = (isinstance(value, list) and len(value) == len(expected)
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        else:
            ok = False
        if not ok:
            raise ValueError(f"{quote(key)} is {quote(value)}")
    return state


def _count(value) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"milestone {quote(value)} is not a count")
    return value


def _ema_state(checkpoint: Path, ema, ema_changed: bool) -> tuple[dict, int] | None:
    """(weights, update count) of the EMA: model_ema.safetensors + ema.json, or an older checkpoint's
    custom_checkpoint_1.pkl. None when the checkpoint was trained without EMA and ``train.ema`` was turned on."""
    if (checkpoint / LEGACY_EMA).exists() and not (checkpoint / EMA_STATE).exists():
        state = _read(checkpoint, LEGACY_EMA, "EMA state", _torch_data)
        if not isinstance(state, dict) or not isinstance(state.get("n_averaged"), torch.Tensor):
            raise invalid_file(checkpoint, LEGACY_EMA, "EMA state", "no n_averaged")
        weights = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
        problem = _misfit(weights, ema.module.state_dict())
        if problem:
            raise invalid_file(checkpoint, LEGACY_EMA, "EMA state", f"does not fit the recipe's model: {problem}")
        return weights, int(state["n_averaged"])
    if ema_changed and not (checkpoint / EMA_STATE).exists():
        logger.warning("%s was trained without train.ema: the EMA starts from the resumed weights", checkpoint)
        return None
    document = _read(checkpoint, EMA_STATE, "EMA state", _json)
    n_averaged = document.get("n_averaged") if isinstance(document, dict) else None
    if type(n_averaged) is not int or not 0 <= n_averaged <= MAX_COUNT:
        raise invalid_file(checkpoint, EMA_STATE, "EMA state", f"n_averaged is {quote(n_averaged)}, not a count")
    return _weights(checkpoint, EMA_WEIGHTS, "EMA weights file", ema.module), n_averaged


def _scaler_state(checkpoint: Path, precision_changed: bool) -> dict | None:
    if precision_changed and not (checkpoint / SCALER_NAME).exists():
        logger.warning("%s was trained without fp16: the gradient scaler starts afresh", checkpoint)
        return None
    state = _read(checkpoint, SCALER_NAME, "gradient scaler state", _torch_data)
    if not isinstance(state, dict) or not isinstance(state.get("scale"), (int, float, torch.Tensor)):
        raise invalid_file(checkpoint, SCALER_NAME, "gradient scaler state", "not a GradScaler state_dict")
    return state


def _rng_states(accelerator, checkpoint: Path, saved: dict, resume_anyway: bool) -> dict | None:
    """This process's RNG states, after reading every process's file (so that every process decides alike).

    None, with a warning, when the checkpoint was written by another number of processes (there is no state for
    this process to take), or when a file cannot be read and ``resume_anyway``.
    """
    plan = saved.get("batch_plan")
    processes = plan[1] if isinstance(plan, list) and len(plan) == 2 and type(plan[1]) is int else None
    if processes is None:  # progress.json written before the batch plan was recorded
        processes = sum(1 for p in checkpoint.iterdir() if re.fullmatch(rf"{RNG_STATE_NAME}_\d+\.pkl", p.name))
    if processes != accelerator.num_processes:
        logger.warning("%s: the RNG state was not restored: the checkpoint was written by %d process(es), this run has "
                       "%d, so its random draws differ from an uninterrupted run's", checkpoint, processes,
                       accelerator.num_processes)
        return None
    what_to_do = ("without it the resumed run draws other random numbers than an uninterrupted one: pass "
                  "--resume-anyway to go on without it, or " + ways_on(checkpoint, ""))
    try:
        states = [_read(checkpoint, rng_file(i), "RNG state", _rng_state, what_to_do) for i in range(processes)]
    except UserError as err:
        if not resume_anyway:
            raise
        logger.warning("the RNG state was not restored (--resume-anyway): %s", str(err).split("; ")[0])
        return None
    return states[accelerator.process_index]



def _rng_state(path: Path) -> dict:
    """Accelerate's RNG file, checked by setting each state into a scratch generator of its kind."""
    states = _torch_data(path, RNG_GLOBALS)
    if not isinstance(states, dict):
        raise ValueError(f"a {type(states).__name__}, not a dict of RNG states")
    random.Random().setstate(states["random_state"])
    np.random.RandomState().set_state(states["numpy_random_seed"])
    torch.Generator().set_state(states["torch_manual_seed"])
    return states


def _set_rng_states(states: dict) -> None:
    """The inverse of Accelerate's save of the RNG states (Python, numpy, torch CPU, the accelerator's if any)."""
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    key = f"torch_{device.type}_manual_seed" if device is not None else None
    if key in states:
        module = torch.get_device_module(device.type)
        value = states[key]
        if isinstance(value, (list, tuple)):
            module.set_rng_state_all(value)
        else:
            module.set_rng_state(value)
