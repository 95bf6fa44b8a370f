"""Recipe files: ``recipes/<name>.py`` (or any file given by its path) defines ``def recipe() -> Recipe`` built on
the defaults of dino.config.

A recipe may import another recipe's function (its folder is importable while it loads), so variants such as a
36-epoch schedule are a few lines on top of the 12-epoch base. Command-line ``--set section.field=value`` overrides
are applied after the recipe is built.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from dino.config import Recipe, apply_overrides
from dino.errors import UserError
from dino.resources import resource_dir

# The project's own recipes (the repository's recipes/ folder, or its copy inside an installed wheel); a recipe
# *name* resolves only here, never from the current folder, whose code would run.
RECIPES_DIR = resource_dir("recipes")
# Said in the --help of every command that takes a recipe: loading one runs its code (as detectron2/mmdetection
# configs do), so a recipe file from elsewhere is a program, not data.
RECIPE_RUNS_AS_PYTHON = "a recipe file runs as Python with your rights: give only recipe files you trust"


def available_recipes(directory: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))


def recipe_path(spec: str) -> Path:
    """The file of recipe ``spec``: a path when it looks like one (ends with ``.py`` or contains a path separator),
    else the name of one of the project's recipes (:data:`RECIPES_DIR`).

    Raises UserError naming ``spec`` (and, for a name, the available names) when there is no such file.
    """
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if spec.endswith(".py") or any(sep in spec for sep in separators):
        path = Path(spec)
        if path.is_dir():
            raise UserError(f"recipe file {spec} is a folder; give a recipe's .py file")
        if not path.is_file():
            raise UserError(f"recipe file {spec} does not exist")
        if path.suffix != ".py":
            raise UserError(f"recipe file {spec} is not a Python file (.py); a recipe is a .py file defining "
                            "`def recipe() -> Recipe:`")
        return path
    path = RECIPES_DIR / f"{spec}.py"
    if not spec or spec.startswith(("_", ".")) or not path.is_file():
        raise UserError(
            f"no recipe named {spec!r}; available: {', '.join(available_recipes()) or 'none'} "
            "(a recipe file of your own is given by its path, e.g. ./my_recipe.py)"
        )
    return path


def load_recipe(spec: str, overrides: list[str] | None = None) -> Recipe:
    """Builds the Recipe of ``spec`` (file path or name) and applies ``section.field=value`` overrides."""
    path = recipe_path(spec).resolve()
    module_name = f"_dino_recipe_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent))  # lets a recipe import its base recipe
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:  # the user's file does not parse: where, not a traceback through importlib
        raise UserError(f"recipe file {path}, line {err.lineno}: {err.msg}: {(err.text or '').strip()!r}") from None
    finally:
        sys.path.remove(str(path.parent))
    build = getattr(module, "recipe", None)
    if not callable(build):
        raise UserError(f"recipe file {path} must define `def recipe() -> Recipe:`")
    cfg = build()
    if not isinstance(cfg, Recipe):
        raise UserError(f"recipe() in {path} returned {type(cfg).__name__}, expected dino.config.Recipe")
    return apply_overrides(cfg, list(overrides or []))


def iter_fields(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (dotted path, value) for every leaf field of a config dataclass."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def flat_config(cfg: Any) -> dict[str, int | float | str | bool]:
    """Flat scalar dict of a config, for trackers that only take scalars (tuples and None become strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in iter_fields(cfg)}
