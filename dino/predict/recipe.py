"""The recipe a :class:`dino.predict.detector.Detector` runs with: the one given (a Recipe, a recipe name or file, a
preset name), or the one a checkpoint records in its metadata (training writes the resolved recipe there,
``{"model.num_classes": 4, "data.val_scale": 800, ...}``; :func:`dino.engine.setup.weights_metadata`). Only the model
and the validation resize matter to detection, and only those recorded fields are read (an allow-list with types and
bounds, :func:`recorded_recipe`): the file may come from anyone, and nothing in it may name a file or pass keyword
arguments to a third-party loader."""
from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path

from dino import untrusted
from dino.config import Recipe, apply_overrides
from dino.engine.recipe import load_recipe, recipe_path
from dino.errors import UserError
from dino.model_loading import read_metadata
from dino.presets import PRESETS, get_preset
from dino.untrusted import MAX_CLASSES, Invalid


def load_recipe_or_preset(spec: str, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe ``spec`` (file or name), or a preset name as the model of a default Recipe; ``--set`` applied."""
    try:
        recipe_path(spec)
    except UserError as err:
        if spec not in PRESETS:
            raise UserError(f"{err}; presets: {', '.join(sorted(PRESETS))}") from None
        return apply_overrides(Recipe(name=spec, model=get_preset(spec)), list(overrides))
    return load_recipe(spec, list(overrides))


# The fields of a recorded recipe that are applied: the model's architecture and the validation resize, each with
# the bounds a model this project builds can have (more would be a hostile file, or need more memory than any machine).
# Every other recorded field (data paths, training settings) is not read: nothing taken from a file may name a file.
# (data.dataset is one of a fixed set of kinds: a string value is at most 100 plain characters.)
_SIZES = {
    "model.num_classes": MAX_CLASSES, "model.num_select": 100_000, "model.transformer.hidden_dim": 16_384,
    "model.transformer.nheads": 1_024, "model.transformer.enc_layers": 256, "model.transformer.dec_layers": 256,
    "model.transformer.dim_feedforward": 65_536, "model.transformer.num_feature_levels": 16,
    "model.transformer.enc_n_points": 64, "model.transformer.dec_n_points": 64,
    "model.transformer.num_queries": 100_000, "model.denoising.dn_number": 100_000,
    "model.denoising.labelbook_size": MAX_CLASSES, "data.val_scale": 16_384, "data.val_max_size": 16_384,
    "data.size_divisibility": 1_024, "data.shapes_train_images": 100_000, "data.shapes_val_images": 100_000,
    "data.shapes_image_size": 4_096, "data.shapes_seed": 2**32,
}
_ALLOWED_PREFIXES = ("model.",)
# The dataset's kind and the built-in shapes dataset's size are allowed too, so that `dino eval` of a checkpoint without
# --recipe evaluates on the same data; its paths (data.root, data.val_images, ...) are not: give --set data.root=...
_ALLOWED = frozenset({"name", "data.val_scale", "data.val_max_size", "data.size_divisibility", "data.dataset",
                      "data.shapes_train_images", "data.shapes_val_images", "data.shapes_image_size",
                      "data.shapes_seed"})
# model.backbone.pretrained names a file or a download: never read here (build_model_from_checkpoint builds the
# backbone without it, the checkpoint replaces every weight), so it is dropped. Every trained checkpoint records it,
# so dropping it says nothing. model.backbone.timm_kwargs goes to timm.create_model as keyword arguments (which can
# name a file to load, checkpoint_path=...): a recorded non-empty one is refused, since the model could not be built
# as trained without it.
_DROPPED = frozenset({"model.backbone.pretrained"})
_REFUSED = frozenset({"model.backbone.timm_kwargs"})
_BACKBONE_NAME = re.compile(r"(timm:)?[A-Za-z0-9_.-]{1,100}")
_MAX_TEXT, _MAX_ITEMS = 100, 16


def _override_text(key: str, value) -> str:
    """A recorded JSON value as the text of a ``--set`` override of its field (tuples were stored as lists), after
    checking its kind and bounds; Invalid naming the field otherwise."""
    items = value if isinstance(value, list) else [value]
    if len(items) > _MAX_ITEMS:
        raise Invalid(f"{key} is {untrusted.quote(value)}, more than {_MAX_ITEMS} values")
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            untrusted.number(item, key)
            if key in _SIZES and not 0 <= item <= _SIZES[key]:
                raise Invalid(f"{key} is {untrusted.quote(item)}, outside 0..{_SIZES[key]:,}")
        elif isinstance(item, str):
            untrusted.text(item, key, _MAX_TEXT)
            if key == "model.backbone.name" and not _BACKBONE_NAME.fullmatch(item):
                raise Invalid(f"{key} is {untrusted.quote(item)}, not a backbone name")
            if untrusted.has_control(item) or item != item.strip():
                raise Invalid(f"{key} is {untrusted.quote(item)}, which no recipe field holds")
        elif item is not None and not isinstance(item, bool):
            raise Invalid(f"{key} is {untrusted.quote(value)}, not a recipe value")
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
    none (an official ``.pth``, a converted checkpoint, weights saved by hand).

    Only the allowed fields apply (the model's architecture, the validation resize, the name), each checked for its
    type and bounds; ``model.backbone.pretrained`` is dropped, a non-empty ``model.backbone.timm_kwargs`` refused.
    UserError naming the file and the field (its value quoted short) for a field that breaks these rules, or a model
    field this version no longer has or that no longer parses.
    """
    text = read_metadata(checkpoint).get("recipe")
    if text is None:
        return None
    try:
        flat = untrusted.obj(untrusted.parse_json(text), "metadata 'recipe'")
    except Invalid as err:
        raise UserError(f"checkpoint {checkpoint}: metadata 'recipe' is not a JSON object of field -> value "
                        f"({err})") from None
    cfg = Recipe()
    for key, value in flat.items():
        if key in _DROPPED or not (key in _ALLOWED or key.startswith(_ALLOWED_PREFIXES)):
            continue
        if key in _REFUSED:
            if value in ({}, None):
                continue
            raise UserError(f"checkpoint {checkpoint}: its recorded recipe sets {key}={untrusted.quote(value)}, "
                            "keyword arguments for timm, which dino never takes from a file (they can make timm read "
                            "other files); give the recipe it was trained with (--recipe, or recipe= in Python)")
        try:
            apply_overrides(cfg, [f"{key}={_override_text(key, value)}"])
            applied = functools.reduce(getattr, key.split("."), cfg)
            if isinstance(value, str) != isinstance(applied, str):  # "64" for an int, 5 for a name: not as written
                raise Invalid(f"{key} is {untrusted.quote(value)} of type {type(value).__name__}; the field is of "
                              f"type {type(applied).__name__}")
        except (Invalid, UserError) as err:
            raise UserError(f"checkpoint {checkpoint}: recorded recipe field {untrusted.quote(key)}: "
                            f"{untrusted.shorten(str(err))}") from None
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
