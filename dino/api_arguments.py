"""Checks of the Python API's arguments (``dino.Detector.load``, ``Detector.__call__``, ``dino.evaluate``,
``dino_export.export``), so that a bad one gets the one line the CLI gives for its flag, naming the argument, instead
of a bare TypeError deep inside, or a silent misreading (a string of overrides read character by character).

Every check raises :class:`dino.errors.UserError` for a bad value and :class:`dino.errors.ArgumentTypeError` (a
UserError and a TypeError) for a wrong type, and returns the value in the form the callee uses.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dino.config import Recipe
from dino.durable import is_one_of
from dino.errors import ArgumentTypeError, UserError

# scheme://..., as a URL is written (http, https, s3, gs, ftp, file ...); a Windows drive "C:\" has no "//".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What dino.evaluate writes into its output_dir (dino.engine.evaluate).
EVALUATION_OUTPUTS = ("results.json", "predictions.json", "pr_curves.png")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse_url(value: str | os.PathLike, name: str) -> None:
    """UserError when ``value`` is a URL: the project never uses the network, and ``Path`` would collapse ``//``."""
    if isinstance(value, str) and _URL.match(value):
        raise UserError(f"{name} {value}: URLs are not read (the project never uses the network): download the file "
                        "first and give its path")


def check_path(value, name: str, optional: bool = False) -> Path | None:
    """A file or folder path argument (str or os.PathLike, not a URL, not empty) as a Path; None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__} "
                                f"{_shown(value)}")
    refuse_url(value, name)
    if str(value) == "":
        raise UserError(f"{name} is an empty path")
    return Path(value)


def check_paths(value, name: str) -> list[Path]:
    """A sequence of paths (a single str is refused: it would be read character by character)."""
    if isinstance(value, (str, os.PathLike)) or not isinstance(value, Sequence):
        raise ArgumentTypeError(f"{name} must be a list of paths, got {type(value).__name__} {_shown(value)}")
    return [check_path(v, f"{name}[{i}]") for i, v in enumerate(value)]


def check_int(value, name: str, minimum: int = 1, optional: bool = False) -> int | None:
    """An integer argument (not a bool, not a float such as 2.5) of at least ``minimum``; None when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {type(value).__name__} {_shown(value)}")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(value, name: str) -> float:
    """A real number in [0, 1] (not a bool, not a string, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {_shown(value)}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UserError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_bool(value, name: str) -> bool:
    """True or False (numpy's bool too), not a truthy string or number."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {type(value).__name__} {_shown(value)}")
    return bool(value)


def check_choice(value, name: str, choices: Sequence[str], optional: bool = False) -> str | None:
    """One of ``choices`` (strings); None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(repr, choices))}, got {_shown(value)}")
    return value


def check_overrides(value, name: str = "overrides") -> list[str]:
    """``section.field=value`` strings (``--set``) as a list; a single string is refused, not split into letters."""
    if isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a list of 'section.field=value' strings, got the string "
                                f"{_shown(value)}; write {name}=[{value!r}]")
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ArgumentTypeError(f"{name} must be a list of 'section.field=value' strings, got {_shown(value)}")
    return list(value)


def check_recipe(value, name: str = "recipe") -> Recipe | str | None:
    """A :class:`dino.config.Recipe`, a recipe name or file, a preset name, or None."""
    if value is None or isinstance(value, Recipe):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a Recipe, a recipe name or file, or None; got "
                                f"{type(value).__name__} {_shown(value)}")
    refuse_url(value, name)
    return str(value)


def check_size(value, name: str = "image_size", optional: bool = False) -> tuple[int, int] | None:
    """An (H, W) size in pixels: two positive integers (not floats such as 64.5, not strings)."""
    if value is None and optional:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ArgumentTypeError(f"{name} must be (H, W), two positive integers in pixels; got {_shown(value)}")
    height, width = (check_int(v, f"{name} {side}") for v, side in zip(value, ("height", "width")))
    return height, width


def check_device_argument(value, name: str = "device") -> str | None:
    """A device name or torch.device (checked for availability by :func:`dino.device.check_device`), or None."""
    if value is None or isinstance(value, torch.device):
        return None if value is None else str(value)
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a str such as 'cpu' or 'cuda', or a torch.device; got "
                                f"{type(value).__name__} {_shown(value)}")
    return value


def check_evaluate_arguments(model, recipe, overrides, output_dir, name: str = "model") -> None:
    """``dino.evaluate``'s arguments (``name``: that of its first, the model or checkpoint), before any work: paths
    and types, and an ``output_dir`` whose files (:data:`EVALUATION_OUTPUTS`) would not replace the model or the
    recipe file."""
    checkpoint = check_path(model, name)
    check_recipe(recipe)
    check_overrides(overrides)
    output_dir = check_path(output_dir, "output_dir", optional=True)
    if output_dir is None:
        return
    weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    inputs = (weights, recipe if isinstance(recipe, (str, os.PathLike)) and Path(recipe).is_file() else None)
    for name in EVALUATION_OUTPUTS:
        given = is_one_of(output_dir / name, inputs)
        if given is not None:
            raise UserError(f"output_dir {output_dir}: its {name} would replace the input {given}; choose another "
                            "output_dir")
