"""Where the project's non-Python files are: the named recipes (``recipes/``) and the kernel sources (``csrc/``).

In a source checkout (or an editable install) they sit next to the ``dino`` package; a built wheel carries them inside
it as package data (``dino/recipes``, ``dino/csrc``: pyproject.toml maps the repository's folders there). Looked up in
that order: inside the package first, so an installed wheel never picks up an unrelated ``recipes/`` folder beside it
in site-packages. A folder found in neither place is an error naming both, never a silent empty list.
"""
from __future__ import annotations

from pathlib import Path

from dino.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
RESOURCES = ("recipes", "csrc")


def resource_dir(name: str) -> Path:
    """The folder ``name`` ("recipes" or "csrc") of this installation."""
    if name not in RESOURCES:
        raise ValueError(f"unknown resource folder {name!r}; known: {RESOURCES}")
    installed, checkout = PACKAGE_DIR / name, PACKAGE_DIR.parent / name
    if installed.is_dir():
        return installed
    if checkout.is_dir() and (PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return checkout
    raise UserError(f"this dino installation has no {name}/ folder (looked in {installed} and {checkout}); "
                    "reinstall it from a wheel or a source checkout built with its package data")
