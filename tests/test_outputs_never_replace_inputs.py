"""No output replaces an input, however the paths are spelled (issue 35, items 1 and 2): an export onto its own
checkpoint given as a file, its run folder, a symlink or a relative path with ``..`` is one line, before any work,
and the weights are unchanged (hashed); an existing folder as the output is one line before the export; an export
replaces only an older artifact of its own kind; ``dino predict`` writes nothing over a file it reads."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import dino_export
import dino_export.export_model
from dino.engine.recipe import load_recipe
from dino.engine.setup import weights_metadata
from dino.errors import UserError
from dino.models.dino import build_model
from dino.weights import save_weights
from dino_cli import main

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder holding a training run's folder ``run/model.safetensors`` (tiny recipe, recorded in the metadata),
    a symlink ``link.safetensors`` to those weights, and a sub folder ``sub``."""
    root = tmp_path_factory.mktemp("outputs")
    cfg = load_recipe(TINY, [f"data.root={root / 'shapes'}"])
    (root / "run").mkdir()
    (root / "sub").mkdir()
    save_weights(build_model(cfg.model).state_dict(), root / "run" / "model.safetensors",
                 weights_metadata(cfg, CATEGORIES))
    (root / "link.safetensors").symlink_to(root / "run" / "model.safetensors")
    return root


def _hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# (checkpoint, output), relative to `root` (the current folder in the test): every spelling of "the same file".
SPELLINGS = {
    "file": ("run/model.safetensors", "run/model.safetensors"),
    "folder": ("run", "run/model.safetensors"),
    "symlink as the checkpoint": ("link.safetensors", "run/model.safetensors"),
    "symlink as the output": ("run/model.safetensors", "link.safetensors"),
    "relative with ..": ("run", "sub/../run/./model.safetensors"),
    "absolute and relative": ("{root}/run/model.safetensors", "run/model.safetensors"),
}


@pytest.fixture()
def no_work(monkeypatch):
    """Fails the test if the model is built or an export starts: a refusal must come before any work."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the export started before the output was checked")

    monkeypatch.setattr(dino_export.export_model, "build_model_from_checkpoint", forbidden)
    monkeypatch.setattr(dino_export.export_model, "export_onnx", forbidden)
    monkeypatch.setattr("dino_export.deploy_model.build_deploy_model", forbidden)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_python_export_onto_its_own_checkpoint_is_refused_and_the_weights_unchanged(root, spelling, monkeypatch,
                                                                                     no_work):
    monkeypatch.chdir(root)
    checkpoint, output = (s.format(root=root) for s in SPELLINGS[spelling])
    before = _hash(root / "run" / "model.safetensors")
    with pytest.raises(UserError, match="is also this command's input.*writing it would replace that input"):
        dino_export.export(checkpoint, "onnx", output, image_size=(64, 64))
    assert _hash(root / "run" / "model.safetensors") == before


@pytest.mark.parametrize("target", ["onnx", "aoti"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_cli_export_onto_its_own_checkpoint_is_one_line_and_the_weights_unchanged(root, spelling, target, capsys,
                                                                                  monkeypatch, no_work):
    monkeypatch.chdir(root)
    checkpoint, output = (s.format(root=root) for s in SPELLINGS[spelling])
    before = _hash(root / "run" / "model.safetensors")
    rc = main(["export", target, "--recipe", TINY, "--checkpoint", checkpoint, "--output", output,
               "--image-size", "64", "64"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[-1].startswith(f"dino export {target}: error: --output {Path(output)} is also this "
                                          "command's input")
    assert _hash(root / "run" / "model.safetensors") == before


def test_bench_json_onto_its_checkpoint_is_refused(root, capsys, monkeypatch, no_work):
    monkeypatch.chdir(root)
    rc = main(["bench", "--recipe", TINY, "--checkpoint", "run", "--json", "link.safetensors", "--backends",
               "eager_fp32", "--image-size", "64", "64", "--device", "cpu"])
    assert rc == 2 and "--json link.safetensors is also this command's input" in capsys.readouterr().err


def test_an_existing_folder_as_the_output_is_one_line_before_the_export(root, capsys, no_work):
    with pytest.raises(UserError, match=f"output {root / 'sub'} is a folder; give the file to write, e.g. output "
                                        f"{root / 'sub' / 'model.onnx'}"):
        dino_export.export(root / "run", "onnx", root / "sub", image_size=(64, 64))
    rc = main(["export", "onnx", "--recipe", TINY, "--checkpoint", str(root / "run"), "--output", str(root / "sub"),
               "--image-size", "64", "64"])
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"dino export onnx: error: --output {root / 'sub'} is a folder; give the file to write, e.g. --output "
        f"{root / 'sub' / 'model.onnx'}")


@pytest.mark.parametrize("name", ["other.safetensors", "weights.pth", "photo.png", "notes"])
def test_an_export_never_replaces_a_file_of_another_kind(root, tmp_path, name, no_work):
    other = tmp_path / name
    other.write_bytes(b"someone's file")
    with pytest.raises(UserError, match=f"output {other} exists and is not an older .onnx file of this kind"):
        dino_export.export(root / "run", "onnx", other, image_size=(64, 64))
    assert other.read_bytes() == b"someone's file"


def test_an_export_replaces_an_older_artifact_of_its_own_kind(root, tmp_path):
    older = tmp_path / "model.onnx"
    older.write_bytes(b"an older export")
    assert dino_export.export(root / "run", "onnx", older, image_size=(64, 64), verify=False) == older
    assert older.read_bytes()[:20] != b"an older export"[:20] and older.stat().st_size > 10_000


def test_predict_refuses_an_output_folder_whose_files_would_replace_what_it_reads(root, tmp_path, capsys):
    image = tmp_path / "cat.png"
    PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    graph = out / "cat.jpg"  # an ONNX graph under a picture's name: the picture of cat.png would replace it
    graph.write_bytes(b"graph")
    rc = main(["predict", str(image), "--onnx", str(graph), "--output", str(out)])
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"dino predict: error: --output {out}: its cat.jpg would replace the input {graph}; give a folder that holds "
        "none of the inputs")
    os.symlink(root / "run" / "model.safetensors", out / "predictions.json")  # spelled through a symlink
    rc = main(["predict", str(image), "--checkpoint", str(root / "run"), "--output", str(out)])
    assert rc == 2 and "its predictions.json would replace the input" in capsys.readouterr().err
    assert graph.read_bytes() == b"graph"


@pytest.mark.parametrize("spelling", ["run/model.safetensors", "run", "link.safetensors"])
def test_train_never_writes_its_final_weights_over_the_weights_it_fine_tunes_from(root, spelling, capsys,
                                                                                  monkeypatch):
    monkeypatch.chdir(root)
    before = _hash(root / "run" / "model.safetensors")
    rc = main(["train", TINY, "--finetune-from", spelling, "--set", "train.output_dir=./run",
               f"data.root={root / 'shapes'}"])
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1].startswith(
        "dino train: error: train.output_dir run/model.safetensors is also this command's input")
    assert _hash(root / "run" / "model.safetensors") == before and not (root / "shapes").exists()
