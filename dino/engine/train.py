"""The training run on Accelerate: one engine behind ``launch.py`` and ``dino train``.

Single process, multi-GPU and multi-node runs are the same code; ``accelerate launch`` decides the topology.
``train`` sets the run up, resumes or fine-tunes, then alternates :func:`~dino.engine.one_epoch.train_one_epoch`
with epoch-end checkpoints, evaluation and logging.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable

import torch
from accelerate.utils import set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from dino.config import Recipe
from dino.durable import make_output_dir
from dino.engine.bad_images import SkippedImages, stop_on_bad_image
from dino.engine.batching import BatchPlan, check_batch_fits, plan_batches
from dino.engine.checkpoint import read_progress
from dino.engine.checkpointer import Checkpointer, Progress
from dino.engine.epoch_line import RunClock, epoch_line
from dino.engine.evaluate import build_val_loader, evaluate
from dino.engine.finetune import load_finetune_weights
from dino.engine.one_epoch import EpochResult, train_one_epoch
from dino.engine.optim import build_optimizer, build_scheduler
from dino.engine.recipe import flat_config
from dino.engine.restore import restore
from dino.engine.resume import check_recipe, check_unfinished, find_checkpoint
from dino.engine.seeding import EpochSeededDataset
from dino.engine.setup import (
    build_accelerator,
    build_model,
    check_queries_fit_training_sizes,
    dataset_categories,
    fit_classes_to,
    resolved_recipe,
    weights_metadata,
)
from dino.engine.step_log import StepLog
from dino.engine.termination import TerminationSignals, data_worker_init
from dino.errors import UserError
from dino.plots.curves import plot_run
from dino.run_lock import run_lock

logger = logging.getLogger("dino.engine")


@dataclass
class Components:
    model: torch.nn.Module
    criterion: torch.nn.Module
    postprocess: torch.nn.Module
    train_set: object
    val_set: object


def build_components(cfg: Recipe, weights_follow: bool) -> Components:
    """Model, criterion, post-processing and both datasets; ``weights_follow``: a checkpoint will be loaded."""
    from dino.criterion import build_criterion
    from dino.data import build_dataset
    from dino.postprocess import PostProcess

    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    fit_classes_to(cfg, train_set)
    model = build_model(cfg.model, weights_follow)
    check_queries_fit_training_sizes(model, cfg)
    return Components(model, build_criterion(cfg.model), PostProcess(cfg.model.num_select), train_set, val_set)


def build_train_loader(dataset, plan: BatchPlan, cfg: Recipe) -> DataLoader:
    from dino.data import collate_fn

    check_batch_fits(plan, len(dataset), str(dataset.annotations_file))
    return DataLoader(
        EpochSeededDataset(dataset, cfg.train.seed),
        batch_size=plan.per_device,
        shuffle=True,
        drop_last=True,  # official: a ragged last batch would change the effective batch
        collate_fn=partial(collate_fn, size_divisibility=cfg.data.size_divisibility),
        num_workers=cfg.data.num_workers,
        # Its own generator: creating a DataLoader iterator draws a seed, which must not come from the global RNG
        # (the model's denoising noise) or a resumed run, whose iterator starts mid-epoch, would draw differently.
        generator=torch.Generator().manual_seed(cfg.train.seed),
        worker_init_fn=data_worker_init(cfg.train.termination_signals),  # the main process decides
    )


def build_ema(accelerator, model, cfg: Recipe) -> AveragedModel | None:
    """EMA of the weights (and buffers): ``ema = decay * ema + (1 - decay) * w`` after each step, a copy at step 1."""
    if not cfg.train.ema:
        return None
    ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                        use_buffers=True)
    return ema


def starting_checkpoint(cfg: Recipe, out: Path, resume: str | None, recipe: dict,
                        resume_anyway: bool) -> tuple[Path | None, dict]:
    """(the checkpoint to resume or None, the accepted recipe differences); raises UserError before anything is built
    when the resume is refused (another recipe without ``resume_anyway``) or the run has already finished."""
    checkpoint = find_checkpoint(resume, out, cfg.train.auto_resume)
    differences = {} if checkpoint is None else check_recipe(
        checkpoint, read_progress(checkpoint).get("recipe"), recipe, resume_anyway)
    check_unfinished(checkpoint, out, cfg.optim.epochs)  # a finished run says so instead of retraining
    return checkpoint, differences


def train(
    cfg: Recipe,
    *,
    resume: str | None = None,
    finetune_from: str | None = None,
    ignore_keys: Iterable[str] = (),
    resume_anyway: bool = False,
    termination: TerminationSignals | None = None,
) -> dict:
    """Trains ``cfg`` in this process (one of ``accelerate launch``'s processes, or alone).

    ``resume``: a checkpoint folder, or an output folder whose latest checkpoint is used. Without it and with
    ``train.auto_resume``, the latest checkpoint in ``train.output_dir`` is resumed; a recipe that differs from the
    checkpoint's is refused unless ``resume_anyway``. ``finetune_from`` loads weights (safetensors or an official .pth)
    before training, dropping class heads and label book when the class count differs and keys matching the
    ``ignore_keys`` regexes (a run that finds a checkpoint to resume resumes instead). ``termination`` (entered by
    ``dino train``): a signal it records ends the run after the current step with a checkpoint on every process,
    raising :class:`~dino.engine.termination.Terminated` (not after the last epoch, which finishes).
    Returns ``{"global_step", "epoch", "eval"}`` (eval stats on the main process, else None).
    """
    accelerator = build_accelerator(cfg)
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        make_output_dir(out, "train.output_dir")
    # One run writes a folder: the main process holds its lock from here to the end (the others pay nothing).
    with run_lock(out, "train.output_dir", hold=accelerator.is_main_process):
        return _train(accelerator, cfg, out, resume, finetune_from, ignore_keys, resume_anyway, termination)


def _train(accelerator, cfg: Recipe, out: Path, resume: str | None, finetune_from: str | None,
           ignore_keys: Iterable[str], resume_anyway: bool, termination: TerminationSignals | None) -> dict:
    plan = plan_batches(cfg.optim.total_batch_size, accelerator.num_processes, cfg.optim.batch_size_per_device)
    if accelerator.is_main_process:
        logger.info("recipe %s: %s", cfg.name, plan.describe())
    recipe = resolved_recipe(cfg)
    checkpoint, differences = starting_checkpoint(cfg, out, resume, recipe, resume_anyway)
    if checkpoint is not None and finetune_from:
        logger.info("continuing the fine-tuning run in %s; --finetune-from %s is not loaded again", checkpoint, finetune_from)
        finetune_from = None

    # Same seed everywhere: identical initial weights on every process (DDP also broadcasts them).
    set_seed(cfg.train.seed)
    parts = build_components(cfg, weights_follow=checkpoint is not None or finetune_from is not None)
    model = parts.model
    if finetune_from:
        load_finetune_weights(model, finetune_from, ignore_keys)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    train_loader = build_train_loader(parts.train_set, plan, cfg)
    val_loader = build_val_loader(parts.val_set, cfg)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    parts.criterion.to(accelerator.device)
    ema = build_ema(accelerator, model, cfg)
    # Official: seed + rank from here on, so each process draws its own denoising noise (a resume restores the states).
    set_seed(cfg.train.seed, device_specific=True)

    progress = Progress()
    if checkpoint is not None:
        progress = restore(accelerator, checkpoint, plan, model, optimizer, scheduler, ema, cfg, differences,
                           resume_anyway)
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(cfg.name, config=flat_config(cfg))
    checkpointer = Checkpointer(accelerator, out, model, ema, plan, cfg.train.keep_checkpoints, recipe,
                                weights_metadata(cfg, dataset_categories(parts.train_set)), scheduler=scheduler)

    per_epoch = _micro_batches_per_epoch(train_loader, plan, cfg)
    step_log = StepLog(out, progress.global_step, accelerator.is_main_process)  # cut back to a resumed step
    clock = RunClock(progress.epoch + progress.batches_in_epoch / per_epoch, cfg.optim.epochs)
    last_eval = None
    skipped = SkippedImages(accelerator, parts.train_set)
    while progress.epoch < cfg.optim.epochs and not _at_max_steps(progress, cfg):
        train_loader.set_epoch(progress.epoch)  # the sampler's shuffle
        # Every sample's augmentation seed (EpochSeededDataset), set before the epoch's iterator (and its workers) is
        # created: Accelerate's set_epoch passes the epoch on to the dataset only when the sampler is not sharded.
        train_loader.dataset.set_epoch(progress.epoch)
        with stop_on_bad_image(out, progress):  # an image that cannot be used: one line, where to resume from
            result = train_one_epoch(accelerator, model, parts.criterion, train_loader, optimizer, progress, cfg,
                                     per_epoch, plan.accumulation, ema, checkpointer, step_log,
                                     termination=termination)
        if result.stopped:
            logger.info("stopped at step %d (train.max_steps=%s)", progress.global_step, cfg.train.max_steps)
            break
        scheduler.step()
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
        checkpointer.save(progress, epoch_end=True)
        # A signal agreed at the epoch's last fetch: the epoch is logged, its evaluation skipped, the run stopped.
        terminating = termination is not None and termination.agreed and progress.epoch < cfg.optim.epochs
        record = _epoch_record(progress, optimizer, result, plan)
        record["skipped_images"] = skipped.since_last()  # data.skip_unreadable: unreadable images skipped
        if _eval_due(cfg, progress.epoch) and not terminating:
            with stop_on_bad_image(out, progress):
                record.update(evaluate_epoch(accelerator, model, ema, parts.postprocess, val_loader, parts.val_set,
                                             out, progress.epoch))
            last_eval = record.get("eval")
        record["eta_s"] = clock.eta_s(progress.epoch)
        _log_epoch(accelerator, out, record, progress.global_step, cfg.optim.epochs)
        if terminating:
            termination.stop(checkpointer, progress)  # the epoch-end checkpoint is the one named

    checkpointer.save_final()
    if accelerator.is_main_process:
        _draw_curves(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": progress.global_step, "epoch": progress.epoch + (progress.batches_in_epoch > 0),
            "eval": last_eval, "skipped_steps": progress.skipped_steps}


def evaluate_epoch(accelerator, model, ema, postprocess, val_loader, val_set, out: Path, epoch: int) -> dict:
    """``{"eval": stats, "eval_ema": stats}`` after ``epoch`` (stats on the main process, None elsewhere)."""
    folder = out / "eval" / f"epoch_{epoch:03d}"
    record = {"eval": evaluate(accelerator, model, postprocess, val_loader, val_set, folder)}
    if ema is not None:
        record["eval_ema"] = evaluate(accelerator, ema.module, postprocess, val_loader, val_set, f"{folder}_ema")
    return record


def _micro_batches_per_epoch(train_loader, plan: BatchPlan, cfg: Recipe) -> int:
    per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.train.max_steps_per_epoch * plan.accumulation)
    return per_epoch


def _at_max_steps(progress: Progress, cfg: Recipe) -> bool:
    return cfg.train.max_steps is not None and progress.global_step >= cfg.train.max_steps


def _eval_due(cfg: Recipe, epoch: int) -> bool:
    every = cfg.train.eval_every_epochs
    return bool(every) and (epoch % every == 0 or epoch == cfg.optim.epochs)


def _epoch_record(progress: Progress, optimizer, result: EpochResult, plan: BatchPlan) -> dict:
    return {
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "lr": optimizer.param_groups[0]["lr"],
        "train": result.means,
        "skipped_steps": progress.skipped_steps,
        "images_per_s": result.batches * plan.per_device * plan.num_processes / max(result.elapsed_s, 1e-9),
        "epoch_time_s": result.elapsed_s,
    }


def _log_epoch(accelerator, out: Path, record: dict, global_step: int, epochs: int) -> None:
    if not accelerator.is_main_process:
        return
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.info("%s", epoch_line(record, epochs))
    logger.debug("epoch %d: %s", record["epoch"], json.dumps(_rounded(record)))
    if record.get("eval"):
        _draw_curves(out)
    scalars = {f"train/{k}": v for k, v in record["train"].items()}
    scalars.update({f"eval/{k}": v for k, v in (record.get("eval") or {}).items() if isinstance(v, (int, float))})
    accelerator.log({**scalars, "epoch": record["epoch"], "images_per_s": record["images_per_s"]}, step=global_step)


def _draw_curves(out: Path) -> None:
    """``curves.png`` of the run so far; a failure to draw is a warning, never the end of a training run."""
    try:
        plot_run(out)
    except UserError as err:  # nothing logged yet (e.g. train.max_steps before the first record)
        logger.debug("no curves drawn: %s", err)
    except Exception:
        logger.warning("could not draw %s", out / "curves.png", exc_info=True)


def _rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.4g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj
