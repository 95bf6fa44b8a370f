"""The refusals a training run can give before its first step, for ``dino data check``: the very functions training
calls, run on the same recipe, each refusal collected as a problem instead of stopping at the first.

Training calls, in order: :func:`~dino.engine.optim.check_schedule` (``dino train``), the run controls and
precision of :func:`~dino.engine.setup.build_accelerator` (:func:`~dino.engine.setup.check_train_config`,
:func:`~dino.engine.setup.resolve_mixed_precision`), :func:`~dino.engine.batching.plan_batches`, the datasets,
:func:`~dino.engine.setup.fit_classes_to`, the model (:func:`~dino.engine.setup.build_model`), the criterion and
the post-processing,
:func:`~dino.engine.batching.check_batch_fits` and :func:`~dino.engine.evaluate.build_val_loader`.
``tests/test_user_errors_sweep.py`` checks that each refusal training gives is also reported here.

Here the model is built on the ``meta`` device (no memory, no weights, nothing downloaded): its config is checked
and its feature levels give the smallest image it can take (:mod:`dino.models.levels`).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch

from dino.config import Recipe
from dino.criterion import build_criterion
from dino.data import build_dataset
from dino.data.check import Problem, dataset_notes
from dino.data.transforms import build_transforms, resized_size
from dino.engine.batching import check_batch_fits, plan_batches
from dino.engine.evaluate import build_val_loader
from dino.engine.optim import check_schedule
from dino.engine.setup import (
    build_model,
    check_queries_fit_training_sizes,
    check_train_config,
    fit_classes_to,
    resolve_mixed_precision,
)
from dino.errors import UserError
from dino.models.levels import image_size_problem
from dino.postprocess import PostProcess

__all__ = ["training_problems"]

SETUP = "training setup"  # the kind of every refusal (dino.data.check.FATAL_KINDS)


def training_problems(cfg: Recipe, num_processes: int, recipe: str,
                      reported: frozenset = frozenset()) -> dict[str, list[Problem]]:
    """Every refusal training would give before its first step with ``cfg`` on ``num_processes`` processes (kind
    "training setup", the file being the ``recipe`` or the annotations file at fault), then what training would
    say about the data (:func:`dino.data.check.dataset_notes`) and the images too small for the model. ``reported``:
    the splits whose stopping problems :func:`dino.data.check.check_split` already listed (their dataset's refusal
    is not listed twice). Returns ``{"train": [...], "val": [...]}`` (the val list: its images too small for the model).
    Never raises for a problem of the recipe or the data; ``cfg`` is not changed."""
    cfg = copy.deepcopy(cfg)
    problems: list[Problem] = []

    def attempt(file: str, check: Callable) -> tuple[bool, object]:
        try:
            return True, check()
        except UserError as err:
            problems.append(Problem(SETUP, file, str(err)))
            return False, None

    attempt(recipe, lambda: check_schedule(cfg.optim))
    attempt(recipe, lambda: check_train_config(cfg))
    attempt(recipe, lambda: resolve_mixed_precision(cfg))
    _, plan = attempt(recipe, lambda: plan_batches(cfg.optim.total_batch_size, num_processes,
                                                   cfg.optim.batch_size_per_device))
    found = {"train": problems, "val": []}
    if not attempt(recipe, lambda: build_transforms(cfg.data, "train"))[0]:
        return found  # the data.* settings: no dataset can be built with them

    def dataset(split: str):
        try:
            with _quiet("dino.data"):  # check_split already reported the dropped boxes
                return build_dataset(cfg.data, split)
        except UserError as err:  # a problem of the data: check_split lists it unless it missed it
            if split not in reported:
                problems.append(Problem(SETUP, recipe, str(err)))
            return None

    train_set, val_set = dataset("train"), dataset("val")
    if train_set is None:  # nothing below can be checked without it
        return found
    source = str(train_set.annotations_file)
    if not attempt(source, lambda: fit_classes_to(cfg, train_set))[0]:
        return found  # the model cannot be sized to the data
    if plan is not None:
        attempt(source, lambda: check_batch_fits(plan, len(train_set), source))
    if val_set is not None:
        attempt(recipe, lambda: build_val_loader(val_set, cfg))
    with torch.device("meta"):  # the config and its feature levels; no memory, no download
        model_ok, model = attempt(recipe, lambda: build_model(cfg.model, weights_follow=True))
        attempt(recipe, lambda: build_criterion(cfg.model))
    attempt(recipe, lambda: PostProcess(cfg.model.num_select))
    problems += dataset_notes(train_set, cfg.model.transformer.num_queries)
    if model_ok and attempt(recipe, lambda: check_queries_fit_training_sizes(model, cfg))[0]:
        problems += _small_images(model, train_set, cfg, "train")
    if model_ok and val_set is not None:
        found["val"] = _small_images(model, val_set, cfg, "val")
    return found


def _small_images(model, dataset, cfg: Recipe, split: str) -> list[Problem]:
    """Images whose smallest resized size (train: the smallest of ``data.train_scales`` under ``train_max_size``;
    val: ``val_scale`` under ``val_max_size``) gives the model fewer encoder tokens than queries: its forward raises
    on a batch of only such images (evaluation takes one image per batch)."""
    scale, max_size = ((min(cfg.data.train_scales), cfg.data.train_max_size) if split == "train"
                       else (cfg.data.val_scale, cfg.data.val_max_size))
    problems = []
    for info in map(dataset.image_info, range(len(dataset))):
        height, width = resized_size(info["height"], info["width"], scale, max_size)
        reason = image_size_problem(model, max(height, 1), max(width, 1))
        if reason is not None:
            problems.append(Problem("image too small for the model", str(Path(dataset.images_dir) / info["file_name"]),
                                    f"image id {info['id']} ({info['width']}x{info['height']}) resized for {split} "
                                    f"to {reason}"))
    return problems


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
