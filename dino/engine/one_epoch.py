"""``train_one_epoch``: the step loop of one epoch (DETR's shape), with gradient accumulation and non-finite checks.

Gradient accumulation is explicit: micro-batches are grouped ``accumulation`` at a time from the epoch's start, each
micro-batch's loss is divided by the size of its group, and only the group's last micro-batch synchronises
gradients across processes. A partial group at the end of an epoch is a full step on the micro-batches it has.

One step of P processes x k micro-batches equals the official step on P x k GPUs: the official criterion normalises
each GPU's losses by the box count averaged over the GPUs, so every micro-batch here is normalised by the box count
of the whole group (all its micro-batches on all processes) divided by P x k. A group's micro-batches are therefore
loaded before its first forward pass.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dino import untrusted
from dino.config import Recipe
from dino.criterion import num_boxes_per_micro_batch
from dino.engine.bad_images import agreed_batches
from dino.engine.checkpointer import Checkpointer, Progress
from dino.engine.nonfinite import NonFiniteStepError, any_process, describe, nonfinite_terms
from dino.engine.optim import scaled_lr, warmup_factor
from dino.engine.step_log import StepLog
from dino.engine.termination import TerminationSignals
from dino.errors import UserError
from dino.matcher import NonFinitePredictionError

logger = logging.getLogger("dino.engine")


@dataclass
class EpochResult:
    means: dict[str, float]  # mean weighted loss terms over this process's finite micro-batches
    batches: int  # micro-batches run by this call
    elapsed_s: float
    stopped: bool  # train.max_steps reached before the epoch's end


class Meter:
    """Running means of the weighted losses over an epoch (local to this process), from ``sums`` over ``count``
    micro-batches already seen (a resumed epoch's, :class:`Progress`)."""

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0) -> None:
        self.sums: dict[str, float] = dict(sums or {})
        self.count = count

    def update(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def float32(tree):
    """Mixed-precision outputs back to fp32 so the losses and matching are computed at full precision."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(float32(v) for v in tree)
    return tree


def _output_tensors(tree):
    if isinstance(tree, torch.Tensor):
        if tree.requires_grad:
            yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _output_tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _output_tensors(v)


def accumulation_group(index: int, per_epoch: int, accumulation: int) -> tuple[int, bool]:
    """(size of the accumulation group of micro-batch ``index``, whether it is the group's last micro-batch)."""
    start = index - index % accumulation
    size = min(accumulation, per_epoch - start)
    return size, index + 1 == start + size


def micro_batch_groups(batches, start: int, per_epoch: int, accumulation: int) -> Iterator[list]:
    """The micro-batches ``start`` .. ``per_epoch - 1`` of ``batches`` (which begins at ``start``) as lists, one per
    accumulation group; ``start`` is a group boundary (checkpoints are written between steps)."""
    group = []
    for index, batch in enumerate(batches, start):
        if index >= per_epoch:
            break
        group.append(batch)
        if accumulation_group(index, per_epoch, accumulation)[1]:
            yield group
            group = []


def weighted_losses(accelerator, model, criterion, images, mask, targets,
                    num_boxes: float | None = None) -> tuple[dict, dict, dict[str, float]]:
    """(model outputs, weighted loss terms + their sum ``loss``, the non-finite terms) of one micro-batch.

    ``num_boxes``: the loss normaliser (see the module docstring); None lets the criterion average this micro-batch's
    box count over the processes. The outputs go to the criterion in fp32. NaN/inf predictions make the matcher fail; that is reported as the term
    ``predictions`` rather than raised, so that the decision to stop is taken by all processes together.
    """
    outputs = model(images, mask, targets)
    if accelerator.mixed_precision != "no":
        outputs = float32(outputs)
    try:
        losses = criterion(outputs, targets, num_boxes=num_boxes)
    except NonFinitePredictionError:
        return outputs, {}, {"predictions": math.nan}
    weighted = {k: losses[k] * w for k, w in criterion.weight_dict.items() if k in losses}
    weighted["loss"] = sum(weighted.values())
    return outputs, weighted, {} if torch.isfinite(weighted["loss"]) else nonfinite_terms(weighted)


def train_one_epoch(
    accelerator,
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    loader,
    optimizer,
    progress: Progress,
    cfg: Recipe,
    per_epoch: int,
    accumulation: int,
    ema=None,
    checkpointer: Checkpointer | None = None,
    step_log: StepLog | None = None,
    termination: TerminationSignals | None = None,
) -> EpochResult:
    """Trains from ``progress.batches_in_epoch`` to ``per_epoch`` micro-batches (or ``train.max_steps``).

    Updates ``progress`` in place; writes mid-epoch checkpoints every ``train.checkpoint_every_steps`` and when
    ``train.max_steps`` stops the run mid-epoch. A non-finite loss (any process) or gradient norm raises
    :class:`NonFiniteStepError` on every process, or skips the step everywhere with ``train.skip_nonfinite_steps``.
    ``step_log`` (main process) gets a record every ``train.log_every_steps`` steps. With ``termination``, a signal
    seen by any process ends the epoch at a step boundary: a checkpoint there, then
    :class:`~dino.engine.termination.Terminated`.
    """
    start = progress.batches_in_epoch
    if start >= per_epoch > 0:
        # progress.json passed its own checks (dino.engine.checkpoint.check_progress); only this run's data says how
        # many micro-batches an epoch has, and a checkpoint is written only before an epoch's end.
        raise UserError(
            f"cannot resume: the checkpoint's progress.json says batches_in_epoch={untrusted.quote(start)}, but an "
            f"epoch of this run has {per_epoch} micro-batches; the file is damaged or was not written with this run's "
            "data: resume an earlier checkpoint, or start over in another train.output_dir"
        )
    if start and not progress.losses_counted and not progress.skipped_steps:
        logger.warning("the checkpoint records no loss sums of the epoch so far (written before they were kept): "
                       "log.jsonl's means of epoch %d cover its batches from %d on", progress.epoch + 1, start + 1)
    model.train()
    criterion.train()
    # An image a process cannot load stops every process at the same micro-batch (ImageError, bad_images.py).
    # A termination signal (any process) ends the iteration before the same micro-batch everywhere (termination.py).
    batches = agreed_batches(accelerator, accelerator.skip_first_batches(loader, start) if start else loader,
                             termination)
    bar = tqdm(total=per_epoch, initial=start, desc=f"epoch {progress.epoch + 1}/{cfg.optim.epochs}", unit="batch",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    meter = Meter(progress.loss_sums, progress.losses_counted)
    window = Meter()  # since the last step record
    group_failure, group_ids = None, []
    stopped = False
    started = time.perf_counter()
    for group in micro_batch_groups(batches, start, per_epoch, accumulation):
        num_boxes = num_boxes_per_micro_batch([targets for _, _, targets in group], accelerator.device)
        for i, (images, mask, targets) in enumerate(group):
            image_ids = [int(t["image_id"]) for t in targets]
            group_ids += image_ids
            last = i == len(group) - 1
            # Only the group's last micro-batch all-reduces gradients across processes.
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                outputs, weighted, bad = weighted_losses(accelerator, model, criterion, images, mask, targets,
                                                         num_boxes)
                if any_process(accelerator, bool(bad)):
                    message = describe(accelerator, "non-finite loss", progress.global_step + 1, progress.epoch + 1,
                                       bad, image_ids)
                    if not cfg.train.skip_nonfinite_steps:
                        raise NonFiniteStepError(
                            message + "; stopping (train.skip_nonfinite_steps=true skips such steps)")
                    group_failure = group_failure or message
                    # Every process still runs a backward through the same graph, which DDP expects; its gradients
                    # are discarded with the step.
                    accelerator.backward(sum(t.sum() for t in _output_tensors(outputs)) * 0.0)
                else:
                    accelerator.backward(weighted["loss"] / len(group))
                    values = {k: v.item() for k, v in weighted.items()}
                    meter.update(values)
                    progress.loss_sums, progress.losses_counted = meter.sums, meter.count  # saved by checkpoints
                    window.update(values)
            progress.batches_in_epoch += 1
            bar.update(1)
        group_failure = _optimizer_step(accelerator, model, optimizer, progress, cfg, group_failure, group_ids)
        progress.global_step += 1
        if group_failure:
            progress.skipped_steps += 1
            logger.warning("skipped (train.skip_nonfinite_steps, %d so far): %s", progress.skipped_steps, group_failure)
        else:
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
            if progress.global_step % max(cfg.train.log_every_steps, 1) == 0:
                # The lr this step used: the scheduled one, scaled during the warm-up.
                lr = optimizer.param_groups[0]["lr"] * warmup_factor(progress.global_step - 1, cfg.optim.warmup_steps)
                loss = weighted["loss"].item()
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
                accelerator.log({"train/loss": loss, "train/lr": lr}, step=progress.global_step)
                if step_log is not None:
                    step_log.append(progress.global_step, progress.epoch + 1, lr, window.means())
                window = Meter()
        group_failure, group_ids = None, []
        at_max = cfg.train.max_steps is not None and progress.global_step >= cfg.train.max_steps
        every = cfg.train.checkpoint_every_steps
        if progress.batches_in_epoch < per_epoch and (at_max or (every and progress.global_step % every == 0)):
            if checkpointer is not None:
                checkpointer.save(progress, epoch_end=False)
            if at_max:
                stopped = True
                break
    bar.close()
    if progress.batches_in_epoch >= per_epoch:  # the epoch-end checkpoint starts the next epoch's sums
        progress.loss_sums, progress.losses_counted = {}, 0
    if termination is not None and termination.agreed and progress.batches_in_epoch < per_epoch:
        termination.stop(checkpointer, progress)  # saves on every process, raises Terminated
    return EpochResult(meter.means(), progress.batches_in_epoch - start, time.perf_counter() - started, stopped)


def _optimizer_step(accelerator, model, optimizer, progress: Progress, cfg: Recipe, failure: str | None,
                    image_ids: list[int]) -> str | None:
    """Clips and steps (unless the group already failed); returns the failure message of a skipped step, if any."""
    if failure is None:
        max_norm = cfg.optim.clip_max_norm if cfg.optim.clip_max_norm > 0 else math.inf
        norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        # Gradients are already all-reduced, so every process sees the same norm: no extra agreement needed.
        # Under fp16 an inf norm is the gradient scaler's business (it skips the step and lowers the scale).
        if not math.isfinite(norm) and accelerator.mixed_precision != "fp16":
            failure = describe(accelerator, "non-finite gradient norm", progress.global_step + 1, progress.epoch + 1,
                               {"grad_norm": norm}, image_ids)
            if not cfg.train.skip_nonfinite_steps:
                raise NonFiniteStepError(failure + "; stopping (train.skip_nonfinite_steps=true skips such steps)")
        else:
            with scaled_lr(optimizer, warmup_factor(progress.global_step, cfg.optim.warmup_steps)):
                optimizer.step()
    optimizer.zero_grad()
    return failure
