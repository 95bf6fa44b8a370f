"""The training loop on Accelerate: one engine behind ``launch.py`` and ``dino train``.

Single process, multi-GPU and multi-node runs are the same code; ``accelerate launch`` decides the topology.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Iterable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    is_tensorboard_available,
    set_seed,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dino.config import Recipe
from dino.engine.batching import plan_batches
from dino.engine.checkpoint import latest_checkpoint, read_progress, save_training_state
from dino.engine.evaluate import build_val_loader, evaluate, unpack_batch
from dino.engine.optim import build_optimizer, build_scheduler
from dino.engine.recipe import flat_config
from dino.engine.seeding import EpochSeededDataset
from dino.model_loading import load_weights
from dino.weights import save_weights

logger = logging.getLogger("dino.engine")

MIXED_PRECISION = ("no", "bf16", "fp16")


def build_accelerator(cfg: Recipe, use_trackers: bool = True) -> Accelerator:
    """Accelerator with DINO's needs: unused-parameter-tolerant DDP, a finite collective timeout, seedable sampling."""
    mixed_precision = cfg.train.mixed_precision
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "no":
        # `accelerate launch --mixed_precision bf16` (or its config file) enables it without editing the recipe.
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"ACCELERATE_MIXED_PRECISION must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if cfg.train.process_group_timeout_s <= 0:
        raise ValueError(f"train.process_group_timeout_s must be positive, got {cfg.train.process_group_timeout_s}")
    log_with = cfg.train.tracker if use_trackers else None
    if log_with == "tensorboard" and not is_tensorboard_available():
        log_with = None  # optional dependency (pip install dino[tensorboard]); the JSON-lines log is always written
    # A previous run in the same process (tests, quickstart) leaves Accelerate's singletons configured; the process
    # group itself (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Under torchrun without GPUs Accelerate only forms a (gloo) process group when told cpu=True; otherwise every
    # process would silently train alone.
    cpu = cfg.train.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        log_with=log_with,
        project_dir=cfg.train.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        kwargs_handlers=[
            # DINO leaves parameters unused in some steps (e.g. the denoising label embedding without targets).
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.process_group_timeout_s)),
        ],
    )


def _float32(tree):
    """Mixed-precision outputs back to fp32 so the losses and matching are computed at full precision."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: _float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_float32(v) for v in tree)
    return tree


class _Meter:
    """Running means of the weighted losses over an epoch (local to this process)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def build_components(cfg: Recipe):
    """(model, criterion, postprocess, train_set, val_set) from the recipe, via the library's public builders."""
    from dino import build_model
    from dino.criterion import build_criterion
    from dino.data import build_dataset
    from dino.postprocess import PostProcess

    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    check_num_classes(cfg, train_set)
    return build_model(cfg.model), build_criterion(cfg.model), PostProcess(cfg.model.num_select), train_set, val_set


def check_num_classes(cfg: Recipe, dataset) -> None:
    n = getattr(dataset, "num_classes", None)
    if n is not None and cfg.model.num_classes < n:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the dataset in {cfg.data.root} has {n} classes; "
            f"set --set model.num_classes={n}"
        )


def train(
    cfg: Recipe,
    *,
    resume: str | None = None,
    pretrained: str | None = None,
    ignore_keys: Iterable[str] = (),
) -> dict:
    """Trains ``cfg`` in this process (one of ``accelerate launch``'s processes, or alone).

    ``resume``: a checkpoint folder, or an output folder whose latest checkpoint is used. Without it and with
    ``train.auto_resume``, the latest checkpoint in ``train.output_dir`` is resumed. ``pretrained`` loads weights
    (safetensors or an official .pth) before training, skipping keys matching the ``ignore_keys`` regexes.
    Returns ``{"global_step", "epoch", "eval"}`` (eval stats on the main process, else None).
    """
    accelerator = build_accelerator(cfg)
    out = Path(cfg.train.output_dir)
    plan = plan_batches(cfg.optim.total_batch_size, accelerator.num_processes, cfg.optim.batch_size_per_device)
    accelerator.gradient_accumulation_steps = plan.accumulation
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        logger.info("recipe %s: %s", cfg.name, plan.describe())
    # Same seed everywhere: identical initial weights on every process; data order comes from the seedable sampler.
    set_seed(cfg.train.seed)

    model, criterion, postprocess, train_set, val_set = build_components(cfg)
    if pretrained:
        missing, unexpected = load_weights(model, pretrained, ignore_keys, strict=False)
        logger.info("loaded %s (%d keys left at init, %d unused)", pretrained, len(missing), len(unexpected))
        if accelerator.is_main_process and missing:
            logger.info("initialised from scratch: %s", ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)

    from dino.data import collate_fn

    train_loader = DataLoader(
        EpochSeededDataset(train_set, cfg.train.seed),
        batch_size=plan.per_device,
        shuffle=True,
        drop_last=True,  # official: a ragged last batch would change the effective batch
        collate_fn=partial(collate_fn, size_divisibility=cfg.data.size_divisibility),
        num_workers=cfg.data.num_workers,
        # Its own generator: creating a DataLoader iterator draws a seed, which must not come from the global RNG
        # (the model's denoising noise) or a resumed run, whose iterator starts mid-epoch, would draw differently.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    if len(train_set) < plan.per_device * plan.num_processes:
        raise ValueError(
            f"the training set in {cfg.data.root} has {len(train_set)} images, fewer than one batch "
            f"({plan.per_device} x {plan.num_processes} processes)"
        )
    val_loader = build_val_loader(val_set, plan.per_device, cfg.data.num_workers, cfg.data.size_divisibility)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    criterion.to(accelerator.device)
    accelerator.register_for_checkpointing(scheduler)
    ema = None
    if cfg.train.ema:
        ema = AveragedModel(
            accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True
        )
        accelerator.register_for_checkpointing(ema)

    start_epoch, skip, global_step = 0, 0, 0
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(resume)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint found (expected {resume}/checkpoints/step_*)")
    elif cfg.train.auto_resume:
        checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        progress = read_progress(checkpoint)
        if progress["batches_in_epoch"] and progress.get("batch_plan") != [plan.per_device, plan.num_processes]:
            raise ValueError(
                f"{checkpoint} stopped mid-epoch with per-device batch x processes = {progress.get('batch_plan')}; "
                f"resume it with the same number of processes (now {plan.per_device} x {plan.num_processes})"
            )
        accelerator.load_state(str(checkpoint))
        start_epoch, skip, global_step = progress["epoch"], progress["batches_in_epoch"], progress["global_step"]
        logger.info("resumed from %s: epoch %d, batch %d, step %d", checkpoint, start_epoch + 1, skip, global_step)

    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(cfg.name, config=flat_config(cfg))

    weight_dict = criterion.weight_dict
    per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.train.max_steps_per_epoch * plan.accumulation)
    images_per_batch = plan.per_device * plan.num_processes

    def save(epoch: int, batches_done: int, epoch_end: bool) -> None:
        weights = {"model.safetensors": accelerator.unwrap_model(model).state_dict()}
        if ema is not None:
            weights["model_ema.safetensors"] = ema.module.state_dict()
        progress = {
            "epoch": epoch + 1 if epoch_end else epoch,
            "batches_in_epoch": 0 if epoch_end else batches_done,
            "global_step": global_step,
            "batch_plan": [plan.per_device, plan.num_processes],
            "recipe": cfg.name,
        }
        path = save_training_state(accelerator, out, progress, weights, keep=cfg.train.keep_checkpoints, epoch_end=epoch_end)
        logger.info("saved %s", path)

    last_eval = None
    stop = cfg.train.max_steps is not None and global_step >= cfg.train.max_steps
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.optim.epochs):
        if stop:
            break
        model.train()
        criterion.train()
        train_loader.set_epoch(epoch)
        if skip == 0:
            accelerator.step = 0  # accumulation groups start at the epoch start
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        bar = tqdm(
            total=per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="batch",
            disable=not accelerator.is_local_main_process, dynamic_ncols=True,
        )
        meter = _Meter()
        batch_index = skip
        started = time.perf_counter()
        for batch in loader:
            if batch_index >= per_epoch:
                break
            images, mask, targets = unpack_batch(batch)
            with accelerator.accumulate(model):
                outputs = model(images, mask, targets)
                if accelerator.mixed_precision != "no":
                    outputs = _float32(outputs)
                losses = criterion(outputs, targets)
                weighted = {k: losses[k] * w for k, w in weight_dict.items() if k in losses}
                total = sum(weighted.values())
                if not torch.isfinite(total):
                    raise RuntimeError(
                        f"loss is {total.item()} at epoch {epoch + 1}, batch {batch_index}; stopping "
                        f"(terms: { {k: round(float(v), 4) for k, v in weighted.items()} })"
                    )
                accelerator.backward(total)
                if accelerator.sync_gradients and cfg.optim.clip_max_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm)
                optimizer.step()
                optimizer.zero_grad()
            batch_index += 1
            meter.update({"loss": total.item(), **{k: v.item() for k, v in weighted.items()}})
            bar.update(1)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
            if global_step % max(cfg.train.log_every_steps, 1) == 0:
                bar.set_postfix(loss=f"{total.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
                accelerator.log({"train/loss": total.item(), "train/lr": optimizer.param_groups[0]["lr"]}, step=global_step)
            at_max = cfg.train.max_steps is not None and global_step >= cfg.train.max_steps
            if batch_index < per_epoch and (
                at_max or (cfg.train.checkpoint_every_steps and global_step % cfg.train.checkpoint_every_steps == 0)
            ):
                save(epoch, batch_index, epoch_end=False)
            if at_max:
                stop = True
                break
        bar.close()
        elapsed = time.perf_counter() - started
        if stop and batch_index < per_epoch:
            logger.info("stopped at step %d (train.max_steps=%s)", global_step, cfg.train.max_steps)
            break
        scheduler.step()
        save(epoch, batch_index, epoch_end=True)
        record = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "lr": optimizer.param_groups[0]["lr"],
            "train": meter.means(),
            "images_per_s": (batch_index - skip) * images_per_batch / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }
        skip = 0
        if cfg.train.eval_every_epochs and ((epoch + 1) % cfg.train.eval_every_epochs == 0 or epoch + 1 == cfg.optim.epochs):
            last_eval = evaluate(accelerator, model, postprocess, val_loader, val_set, out / "eval" / f"epoch_{epoch + 1:03d}")
            record["eval"] = last_eval
            if ema is not None:
                record["eval_ema"] = evaluate(
                    accelerator, ema.module, postprocess, val_loader, val_set, out / "eval" / f"epoch_{epoch + 1:03d}_ema"
                )
        if accelerator.is_main_process:
            _append_jsonl(out / "log.jsonl", record)
            logger.info("epoch %d: %s", epoch + 1, json.dumps(_rounded(record)))
            scalars = {f"train/{k}": v for k, v in record["train"].items()}
            scalars.update({f"eval/{k}": v for k, v in (record.get("eval") or {}).items() if isinstance(v, (int, float))})
            accelerator.log({**scalars, "epoch": epoch + 1, "images_per_s": record["images_per_s"]}, step=global_step)
        stop = stop or (cfg.train.max_steps is not None and global_step >= cfg.train.max_steps)

    if accelerator.is_main_process:
        save_weights(accelerator.unwrap_model(model).state_dict(), out / "model.safetensors", {"recipe": cfg.name})
        if ema is not None:
            save_weights(ema.module.state_dict(), out / "model_ema.safetensors", {"recipe": cfg.name})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "epoch": epoch + 1, "eval": last_eval}


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.4g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj
