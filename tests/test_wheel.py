"""The built wheel, installed into a fresh virtual environment without the repository on the path, works: `dino --help`,
a named recipe resolved by `dino train`, the kernel and plugin sources reachable, and a tiny `dino predict`.

Offline and quick: the wheel is built without build isolation and installed with ``--no-deps --no-index``; the new
environment reaches torch and the other dependencies through a ``.pth`` line naming this interpreter's site-packages
(a plain path line, so the editable install of the repository that may live there is not activated).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dino.models.dino import build_model
from dino.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
# The installed import name of the repository's export/ folder (pyproject.toml [tool.setuptools.package-dir]).
EXPORT_IMPORT_NAME = "dino_export"
# Repository folder -> folder inside the wheel.
WHEEL_LAYOUT = {"dino": "dino", "dino_cli": "dino_cli", "export": EXPORT_IMPORT_NAME, "recipes": "dino/recipes",
                "csrc": "dino/csrc"}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build", "*.egg-info")


def _sh(args, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _source_files() -> set[str]:
    """Every file of the repository folders that the wheel must carry, as paths inside the wheel."""
    files = set()
    for folder, target in WHEEL_LAYOUT.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
                files.add(f"{target}/{path.relative_to(REPO / folder).as_posix()}")
    return files


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in WHEEL_LAYOUT:
        shutil.copytree(REPO / folder, src / folder, ignore=IGNORED)
    _sh([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist"])
    (wheel,) = (tmp / "dist").glob("dino-*.whl")
    env_dir = tmp / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", env_dir])
    python = env_dir / "bin" / "python"
    _sh([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    purelib = _sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "shared_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp / "work"  # the current directory of every command: no recipes/ or source folder in sight
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {"wheel": wheel, "python": python, "bin": env_dir / "bin", "work": work, "env": env}


def _run(venv, *args) -> subprocess.CompletedProcess:
    return _sh(args, cwd=venv["work"], env=venv["env"])


def test_code_imports_the_installed_export_name():
    """The wheel installs export/ as EXPORT_IMPORT_NAME, so no module may import it as `export`."""
    pattern = re.compile(r"^\s*(from export[.\s]|import export\b)", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for folder in ("dino", "dino_cli", "export", "tests") for p in
                 (REPO / folder).rglob("*.py") if pattern.search(p.read_text())]
    offenders += ["launch.py"] if pattern.search((REPO / "launch.py").read_text()) else []
    assert offenders == [], f"still importing `export` instead of `{EXPORT_IMPORT_NAME}`: {offenders}"


def test_wheel_holds_every_source_file_and_no_top_level_export(venv):
    names = set(zipfile.ZipFile(venv["wheel"]).namelist())
    missing = sorted(_source_files() - names)
    assert missing == [], f"not in the wheel (add the subpackage to pyproject.toml `packages`): {missing}"
    top_level = {n.split("/")[0] for n in names if not n.startswith("dino-")}
    assert top_level == {"dino", "dino_cli", EXPORT_IMPORT_NAME}


def test_installed_package_runs_without_the_repository(venv, tmp_path):
    check = (
        "import importlib.util, dino, dino_cli, {export}.onnx_export, dino.predict.artifacts\n"
        "from dino.ops.kernel import kernel_sources\n"
        "from dino.resources import resource_dir\n"
        "assert importlib.util.find_spec('export') is None\n"
        "assert all(p.is_file() for p in kernel_sources()), kernel_sources()\n"
        "assert (resource_dir('csrc') / 'tensorrt' / 'CMakeLists.txt').is_file()\n"
        "print(dino.__file__); print(resource_dir('recipes'))\n"
    ).format(export=EXPORT_IMPORT_NAME)
    dino_file, recipes = _run(venv, venv["python"], "-c", check).stdout.split()
    site_dir = str(venv["python"].parent.parent)
    assert dino_file.startswith(site_dir) and recipes.startswith(site_dir), (dino_file, recipes)

    dino = venv["bin"] / "dino"
    assert "predict" in _run(venv, dino, "--help").stdout
    help_text = _run(venv, dino, "train", "--help").stdout
    assert re.search(r"available: .*dino_r50_4scale_12ep.*quickstart", help_text.replace("\n", " "))
    resolved = _run(venv, dino, "train", "dino_r50_4scale_12ep", "--print-recipe").stdout
    assert "name = 'dino_r50_4scale_12ep'" in resolved and "model.backbone.pretrained = 'torchvision'" in resolved

    import PIL.Image
    import torch

    from dino.engine.recipe import load_recipe

    torch.manual_seed(0)
    checkpoint = tmp_path / "model.safetensors"
    save_weights(build_model(load_recipe("quickstart").model).state_dict(), checkpoint)
    image = tmp_path / "square.png"
    PIL.Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    _run(venv, dino, "predict", image, "--recipe", "quickstart", "--checkpoint", checkpoint, "--output",
         tmp_path / "out", "--device", "cpu", "--score-threshold", "0")
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert result["images"][0]["width"] == 64 and result["images"][0]["detections"]
    assert (tmp_path / "out" / result["images"][0]["picture"]).is_file()
