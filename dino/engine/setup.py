"""What training and evaluation both set up: the Accelerator, the model (and whether it may download), the datasets.

Shared by :mod:`dino.engine.train` and :mod:`dino.engine.evaluate`, which do not import each other.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    is_tensorboard_available,
)

from dino.config import ModelConfig, Recipe
from dino.data import fit_num_classes
from dino.data.check import dataset_notes
from dino.engine.checkpoint import check_keep
from dino.engine.recipe import iter_fields
from dino.errors import SharedUserError, UserError
from dino.model_loading import without_pretrained_backbone
from dino.models.levels import image_size_problem

logger = logging.getLogger("dino.engine")

MIXED_PRECISION = ("no", "bf16", "fp16")
# Backbone weights fetched from the internet (torchvision's or timm's hub) rather than read from a file.
DOWNLOADED_BACKBONES = ("torchvision", "timm")


def resolve_mixed_precision(cfg: Recipe) -> tuple[str, str]:
    """(precision, where it came from): the recipe's ``train.mixed_precision``, else ``accelerate launch``'s choice."""
    recipe = cfg.train.mixed_precision
    if recipe not in MIXED_PRECISION:
        raise UserError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {recipe!r}")
    # `accelerate launch --mixed_precision bf16` (or its `accelerate config` file) exports this variable.
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in MIXED_PRECISION:
        raise UserError(f"ACCELERATE_MIXED_PRECISION must be one of {MIXED_PRECISION}, got {launcher!r}")
    if recipe != "no":
        if launcher not in ("no", recipe):
            logger.warning("train.mixed_precision=%s overrides accelerate's mixed_precision=%s", recipe, launcher)
        return recipe, "the recipe's train.mixed_precision"
    if launcher != "no":
        return launcher, "accelerate launch / accelerate config (the recipe says 'no')"
    return "no", "the recipe's train.mixed_precision"


# Run-control counts: (field, smallest value, what the smallest or None means), refused below it: a negative
# train.max_steps stopped before the first step and wrote untrained weights; a negative checkpoint interval saved every
# step.
_TRAIN_COUNTS = (
    ("max_steps", 1, "none: no limit"),
    ("max_steps_per_epoch", 1, "none: whole epochs"),
    ("checkpoint_every_steps", 0, "0: only at the end of each epoch"),
    ("eval_every_epochs", 0, "0: no evaluation during training"),
    ("log_every_steps", 1, "1: every step"),
)


def check_train_config(cfg: Recipe) -> None:
    """Rejects run-control values that would only fail (or misbehave) later."""
    check_keep(cfg.train.keep_checkpoints)
    if cfg.train.process_group_timeout_s <= 0:
        raise UserError(f"train.process_group_timeout_s must be positive, got {cfg.train.process_group_timeout_s}")
    for name, low, meaning in _TRAIN_COUNTS:
        value = getattr(cfg.train, name)
        if value is not None and value < low:
            raise UserError(f"train.{name} must be >= {low} ({meaning}), got {value}")
    if not 0 <= cfg.train.seed < 2**32:  # numpy's seeds
        raise UserError(f"train.seed must be in [0, 2**32), got {cfg.train.seed}")
    if not 0 <= cfg.train.ema_decay <= 1:
        raise UserError(f"train.ema_decay must be in [0, 1] (ema = decay x ema + (1 - decay) x weights), got "
                        f"{cfg.train.ema_decay}")


def build_accelerator(cfg: Recipe, use_trackers: bool = True) -> Accelerator:
    """Accelerator with DINO's needs: a finite collective timeout, seedable sampling, the precision logged."""
    check_train_config(cfg)
    mixed_precision, source = resolve_mixed_precision(cfg)
    log_with = cfg.train.tracker if use_trackers else None
    if log_with == "tensorboard" and not is_tensorboard_available():
        logger.warning("train.tracker='tensorboard' but TensorBoard is not installed (pip install dino[tensorboard]); "
                       "metrics go to log.jsonl only")
        log_with = None
    # A previous run in the same process (tests, quickstart) leaves Accelerate's singletons configured; the process
    # group itself (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Under torchrun without GPUs Accelerate only forms a (gloo) process group when told cpu=True; otherwise every
    # process would silently train alone.
    cpu = cfg.train.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        log_with=log_with,
        project_dir=cfg.train.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        kwargs_handlers=[
            # Every parameter takes part in every step (the model adds label_enc x 0 when no denoising runs), so
            # DDP need not search the graph for unused ones each step; train.find_unused_parameters turns it back on.
            DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.process_group_timeout_s)),
        ],
    )
    logger.info("mixed precision: %s (from %s) on %s", accelerator.mixed_precision, source, accelerator.device)
    return accelerator


def model_config_for(model_cfg: ModelConfig, weights_follow: bool) -> ModelConfig:
    """``model_cfg``, without pretrained backbone weights when a full checkpoint will be loaded over them anyway.

    A checkpoint replaces every backbone weight, so fetching ImageNet weights first would only download (and fail
    offline) for nothing.
    """
    return without_pretrained_backbone(model_cfg) if weights_follow else model_cfg


def build_model(model_cfg: ModelConfig, weights_follow: bool) -> torch.nn.Module:
    """The recipe's model; ``weights_follow``: a full checkpoint will be loaded into it (so nothing is downloaded).

    A failed download of pretrained backbone weights is one UserError line saying what was fetched and what to do.
    """
    from dino import build_model as build

    model_cfg = model_config_for(model_cfg, weights_follow)
    pretrained = model_cfg.backbone.pretrained
    if pretrained not in DOWNLOADED_BACKBONES:
        return build(model_cfg)
    try:
        return build(model_cfg)
    except OSError as err:  # URLError, requests' and huggingface_hub's connection errors are all OSErrors
        raise UserError(
            f"model.backbone.pretrained={pretrained!r}: fetching the pretrained weights of backbone "
            f"{model_cfg.backbone.name!r} failed ({type(err).__name__}: {err}); download them where there is internet "
            "and pass the file with --set model.backbone.pretrained=/path/to/weights.pth (or .safetensors)"
        ) from err


def fit_classes_to(cfg: Recipe, dataset) -> None:
    """Sizes ``cfg.model``'s class head and denoising label book to ``dataset`` (labels are category ids), in place;
    values the recipe set are checked instead (:func:`dino.data.fit_num_classes`). Logs what the data implies and
    ``dino data check`` also lists (:func:`dino.data.check.dataset_notes`): a head larger than the number of
    categories, images with more boxes than the model has queries."""
    fit_num_classes(cfg.model, dataset.num_classes, str(dataset.annotations_file))
    for note in dataset_notes(dataset, cfg.model.transformer.num_queries):
        logger.info("%s: %s", note.file, note.detail)


def check_queries_fit_training_sizes(model: torch.nn.Module, cfg: Recipe) -> None:
    """SharedUserError when no training input can give ``model`` (a built DINO) as many encoder tokens as it has
    queries: even the largest input training makes (short side the largest of ``data.train_scales``, long side
    ``data.train_max_size``) gives fewer, so every step would fail (or first exhaust the memory on the queries'
    attention, as ``num_queries=1000000`` did)."""
    short = min(max(cfg.data.train_scales), cfg.data.train_max_size)
    problem = image_size_problem(model, short, cfg.data.train_max_size)
    if problem is not None:
        raise SharedUserError(f"no training input fits the model: the largest (data.train_scales up to "
                              f"{max(cfg.data.train_scales)}, data.train_max_size={cfg.data.train_max_size}), "
                              f"{problem}: lower model.transformer.num_queries or train at larger sizes")


def resolved_recipe(cfg: Recipe) -> dict:
    """The recipe as a flat JSON-ready dict ``{"optim.lr": 0.0001, ...}`` (tuples become lists)."""
    return json.loads(json.dumps(dict(iter_fields(cfg)), default=str))


def dataset_categories(dataset) -> list[dict]:
    """``[{"id": 1, "name": "person"}, ...]``: the dataset's categories, ids as in its annotations file."""
    return [{"id": c["id"], "name": c.get("name", f"class {c['id']}")} for c in getattr(dataset, "categories", [])]


def weights_metadata(cfg: Recipe, categories: list[dict]) -> dict[str, str]:
    """The safetensors metadata of every ``model.safetensors`` training writes (CONTRACTS.md item 3)."""
    return {"categories": json.dumps(categories), "recipe": json.dumps(resolved_recipe(cfg))}
