"""The import direction of docs/ARCHITECTURE.md, read from the sources (every import, inside functions too):
``dino/`` never imports ``dino_export`` or ``dino_cli``, and data -> models -> criterion -> engine flows one way."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> what it must never import (the stages after it, and the layers above dino/)
FORBIDDEN = {
    "dino": ("dino_export", "dino_cli"),
    "dino.data": ("dino.models", "dino.criterion", "dino.engine"),
    "dino.models": ("dino.criterion", "dino.engine"),
    "dino.criterion": ("dino.engine",),
}


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module ``source`` imports, relative imports resolved against ``package``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def module_files(package: str) -> list[Path]:
    folder = ROOT.joinpath(*package.split("."))
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]


@pytest.mark.parametrize("package", FORBIDDEN)
def test_imports_flow_one_way(package):
    offences = []
    for path in module_files(package):
        owner = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for name in sorted(imported_modules(path.read_text(), owner)):
            bad = [f for f in FORBIDDEN[package] if name == f or name.startswith(f + ".")]
            if bad:
                offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offences == []


def test_the_checker_sees_imports_inside_functions_and_relative_ones():
    source = "import torch\ndef f():\n    from dino_export.onnx_export import export_onnx\nfrom ..engine import train\n"
    names = imported_modules(source, "dino.models")
    assert {"torch", "dino_export.onnx_export", "dino.engine", "dino.engine.train"} <= names
