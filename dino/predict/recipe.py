"""The recipe a :class:`dino.predict.detector.Detector` runs with: the one given (a Recipe, a recipe name or file, a
preset name), or the one a checkpoint records in its metadata (training writes the resolved recipe there,
``{"model.num_classes": 4, "data.val_scale": 800, ...}``; :func:`dino.engine.setup.weights_metadata`). Only the model
and the validation resize matter to detection; the rest is carried along."""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

from dino.config import Recipe, apply_overrides
from dino.engine.recipe import load_recipe, recipe_path
from dino.errors import UserError
from dino.model_loading import read_metadata
from dino.presets import PRESETS, get_preset


def load_recipe_or_preset(spec: str, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe ``spec`` (file or name), or a preset name as the model of a default Recipe; ``--set`` applied."""
    try:
        recipe_path(spec)
    except UserError as err:
        if spec not in PRESETS:
            raise UserError(f"{err}; presets: {', '.join(sorted(PRESETS))}") from None
        return apply_overrides(Recipe(name=spec, model=get_preset(spec)), list(overrides))
    return load_recipe(spec, list(overrides))


def _override_text(value) -> str:
    """A recorded JSON value as the text of a ``--set`` override of its field (tuples were stored as lists)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return repr(tuple(value))
    if isinstance(value, str):
        return value
    return repr(value)


def recorded_recipe(checkpoint: str | os.PathLike) -> Recipe | None:
    """The recipe ``checkpoint`` was trained with (its safetensors metadata ``"recipe"``), or None when it records
    none (an official ``.pth``, a converted checkpoint, weights saved by hand). Fields this version no longer has are
    left out; a model field that no longer parses is a UserError naming it."""
    text = read_metadata(checkpoint).get("recipe")
    if text is None:
        return None
    try:
        flat = json.loads(text)
    except ValueError:
        flat = None
    if not isinstance(flat, dict):
        raise UserError(f"checkpoint {checkpoint}: metadata 'recipe' is not a JSON object of field -> value")
    cfg = Recipe()
    for key, value in flat.items():
        try:
            apply_overrides(cfg, [f"{key}={_override_text(value)}"])
        except UserError as err:
            if key.startswith("model.") or key.startswith("data.val"):
                raise UserError(f"checkpoint {checkpoint}: recorded recipe field {key}: {err}") from None
    return cfg


def detector_recipe(recipe: Recipe | str | None, checkpoint: Path | None, overrides: Sequence[str] = (),
                    artifact: Path | None = None) -> Recipe:
    """The Recipe to detect with (a copy; ``overrides`` applied): ``recipe`` when given, else the one ``checkpoint``
    records. UserError when neither gives one, naming the file and what to pass."""
    if isinstance(recipe, Recipe):
        return apply_overrides(copy.deepcopy(recipe), list(overrides))
    if isinstance(recipe, str):
        return load_recipe_or_preset(recipe, overrides)
    if recipe is not None:
        raise UserError(f"recipe must be a dino.config.Recipe, a recipe name or file, got {type(recipe).__name__}")
    cfg = recorded_recipe(checkpoint) if checkpoint is not None else None
    if cfg is None:
        source = artifact if artifact is not None else checkpoint
        raise UserError(f"{source} does not record the recipe of its model: give it (--recipe NAME_OR_FILE, or "
                        "recipe= in Python)" + (", or the checkpoint it was exported from (--checkpoint)"
                                                if artifact is not None and checkpoint is None else ""))
    return apply_overrides(cfg, list(overrides))
