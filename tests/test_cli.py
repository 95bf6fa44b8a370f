"""The `dino` front door: one parser, UserError as one line with exit 2, every other exception with its traceback,
the same --set everywhere, launch.py as `dino train`, and loading a checkpoint never downloading."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import dino_cli
from dino.engine.recipe import load_recipe
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint, read_categories, read_state_dict
from dino.models.dino import build_model
from dino.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "engine_tiny_recipe.py")


def _run(argv, capsys):
    rc = dino_cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dino_cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("convert-official", "train", "eval", "export", "bench", "predict"):
        assert command in out


@pytest.mark.parametrize("argv", [
    ["train", TINY],
    ["eval", "--recipe", TINY, "--checkpoint", "x.safetensors"],
    ["predict", "x.png", "--recipe", TINY, "--checkpoint", "x.safetensors"],
    ["export", "onnx", "--recipe", TINY, "--checkpoint", "x.safetensors"],
    ["bench", "--recipe", TINY],
])
def test_set_is_the_same_flag_with_the_same_error_in_every_command(argv, capsys):
    rc, _, err = _run([*argv, "--set", "data.root=/tmp/x", "optim.nope=1"], capsys)
    assert rc == 2
    assert err.strip().endswith("error: override 'optim.nope=1': no field 'nope' in OptimConfig")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value,expected", [("1.5", "an integer"), ("ten", "an integer")])
def test_set_value_of_the_wrong_type_is_one_line_before_anything_runs(value, expected, capsys):
    rc, out, err = _run(["train", TINY, "--set", f"optim.epochs={value}"], capsys)
    assert rc == 2 and out == ""
    assert err == f"dino train: error: override 'optim.epochs={value}': optim.epochs must be {expected}, got '{value}'\n"


@pytest.mark.parametrize("argv", [
    ["predict", "x.png", "--recipe", TINY, "--checkpoint", "x.safetensors"],
    ["export", "aoti", "--recipe", TINY, "--checkpoint", "x.safetensors"],
    ["bench", "--recipe", TINY],
])
def test_device_cuda_without_a_gpu_is_one_line(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = _run([*argv, "--device", "cuda"], capsys)
    assert rc == 2
    assert err.endswith(": error: --device cuda: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                        "False); use --device cpu\n") and len(err.splitlines()) == 1
    rc, _, err = _run([*argv, "--device", "gpu"], capsys)
    assert rc == 2 and err.endswith(": error: --device 'gpu' is not a device: use cpu or cuda (cuda:N for the N-th GPU)\n")


def test_lr_drop_outside_the_epochs_is_one_line_before_anything_runs(tmp_path, capsys):
    rc, _, err = _run(["train", TINY, "--set", f"train.output_dir={tmp_path / 'out'}", "optim.epochs=4",
                       "optim.lr_drop_epochs=3,5"], capsys)
    assert rc == 2 and err == (
        "dino train: error: optim.lr_drop_epochs=(3, 5): 5 outside the epochs 1..4 (optim.epochs=4); set both, e.g. "
        "--set optim.epochs=4 optim.lr_drop_epochs=3, or optim.lr_drop_epochs=() for no drop\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["file", "file_parent", "read_only"])
def test_output_folder_that_is_a_file_or_read_only_is_one_line(kind, tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("a user's file")
    out = {"file": tmp_path / "taken", "file_parent": tmp_path / "taken" / "run", "read_only": tmp_path / "ro"}[kind]
    expected = {
        "file": f"train.output_dir {out} is a file, not a folder; choose another train.output_dir",
        "file_parent": f"train.output_dir {out}: {tmp_path / 'taken'} is a file, not a folder; choose another "
                       "train.output_dir",
        "read_only": f"train.output_dir {out} is not writable (read-only folder or file system); choose a writable "
                     "folder",
    }[kind]
    if kind == "read_only":  # chmod does not stop root (the CI user); access() is what the check asks
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    rc, _, err = _run(["train", TINY, "--set", f"train.output_dir={out}"], capsys)
    assert (rc, err) == (2, f"dino train: error: {expected}\n")
    assert (tmp_path / "taken").read_text() == "a user's file"
    (tmp_path / "c.safetensors").write_bytes(b"weights")  # dino eval checks the model before its output folder
    rc, _, err = _run(["eval", "--recipe", TINY, "--checkpoint", str(tmp_path / "c.safetensors"), "--output-dir",
                       str(out)], capsys)
    assert (rc, err) == (2, f"dino eval: error: {expected.replace('train.output_dir', '--output-dir')}\n")


def test_ctrl_c_is_one_line_saying_where_the_last_checkpoint_is(tmp_path, monkeypatch, capsys):
    from dino.engine import train as engine_train
    from tests.test_engine_checkpoint import FakeAccelerator
    from dino.engine.checkpoint import save_training_state

    out = tmp_path / "out"

    def interrupted(cfg, **kwargs):
        save_training_state(FakeAccelerator(), out, {"global_step": 7, "epoch": 1, "batches_in_epoch": 3},
                            {"model.safetensors": {"w": torch.zeros(1)}})
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_train, "train", interrupted)
    rc, _, err = _run(["train", TINY, "--set", f"train.output_dir={out}"], capsys)
    assert (rc, err) == (130, f"dino train: interrupted; last checkpoint: {out / 'checkpoints' / 'step_00000007'} "
                              "(step 7, epoch 2, batch 3); rerun the same command to resume from it\n")
    rc, _, err = _run(["train", TINY, "--set", f"train.output_dir={out}", "train.auto_resume=false"], capsys)
    assert rc == 130 and err.endswith("(step 7, epoch 2, batch 3); resume with --resume <that folder>\n")

    def interrupted_early(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_train, "train", interrupted_early)
    rc, _, err = _run(["train", TINY, "--set", f"train.output_dir={tmp_path / 'new'}"], capsys)
    assert (rc, err) == (130, f"dino train: interrupted; no checkpoint in {tmp_path / 'new'} yet, so rerunning starts "
                              "from the beginning\n")


def test_rerunning_a_finished_training_says_so_instead_of_retraining(tmp_path, capsys):
    from dino.engine.checkpoint import save_training_state
    from dino.engine.setup import resolved_recipe
    from tests.test_engine_checkpoint import FakeAccelerator

    out = tmp_path / "out"
    overrides = ["--set", f"train.output_dir={out}", f"data.root={tmp_path / 'shapes'}"]
    recipe = resolved_recipe(load_recipe(TINY, overrides[1:]))
    end = save_training_state(FakeAccelerator(), out, {"global_step": 4, "epoch": 2, "batches_in_epoch": 0,
                                                       "recipe": recipe}, {}, epoch_end=True)
    rc, _, err = _run(["train", TINY, *overrides], capsys)
    assert (rc, err) == (2, f"dino train: error: already finished: {out}, epoch 2/2 ({end}); to train again use a new "
                            "train.output_dir or --set train.auto_resume=false (starts over there, replacing its "
                            "model.safetensors); to train longer raise optim.epochs and pass --resume-anyway\n")
    assert not (tmp_path / "shapes").exists()  # refused before the data or the model were built


@pytest.mark.parametrize("exc,prefix", [(UserError("disk full"), "dino eval: error: disk full"),
                                         (KeyboardInterrupt(), "dino eval: interrupted")])
def test_the_message_of_a_failure_under_a_progress_bar_starts_its_own_line(exc, prefix, monkeypatch, capsys):
    import sys

    from tqdm import tqdm

    from dino.engine import cli as engine_cli

    def run(args):
        bar = tqdm(total=4, desc="epoch 1/2", file=sys.stderr)
        bar.update(1)
        raise exc

    monkeypatch.setattr(engine_cli, "run_eval", run)
    rc, _, err = _run(["eval", "--recipe", TINY, "--checkpoint", "c"], capsys)
    assert rc == (2 if isinstance(exc, UserError) else 130)
    assert err.endswith(f"\n{prefix}\n") and "epoch 1/2" in err


def test_user_error_is_one_line_and_other_errors_keep_their_traceback(monkeypatch, capsys):
    from dino.engine import cli as engine_cli

    def fail_with(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr(engine_cli, "run_eval", fail_with(UserError("bad thing in /x/y.json")))
    rc, _, err = _run(["eval", "--recipe", TINY, "--checkpoint", "c"], capsys)
    assert (rc, err) == (2, "dino eval: error: bad thing in /x/y.json\n")
    for exc in (RuntimeError("CUDA out of memory"), KeyError("pred_logits"), FileNotFoundError("a bug")):
        monkeypatch.setattr(engine_cli, "run_eval", fail_with(exc))
        with pytest.raises(type(exc)):
            dino_cli.main(["eval", "--recipe", TINY, "--checkpoint", "c"])


def test_launch_is_dino_train(capsys):
    rc = dino_cli.launch_main([TINY, "--set", "optim.lr=1e-3", "--print-recipe"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "optim.lr = 0.001" in out  # the real dino train ran (print-recipe) with the override
    rc = dino_cli.launch_main([TINY, "--ignore-keys", "class_embed"])
    assert rc == 2 and capsys.readouterr().err == "launch.py: error: --ignore-keys needs --finetune-from\n"


# --- checkpoints: corrupt files are user errors; loading one never downloads -----------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = load_recipe(TINY, [f"data.root={root / 'shapes'}"])
    path = root / "model.safetensors"
    save_weights(build_model(cfg.model).state_dict(), path)
    return cfg, path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_is_one_line_naming_the_file(tiny_checkpoint, tmp_path, capsys, damage):
    cfg, good = tiny_checkpoint
    data = good.read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x13\x00garbage" * 10, "empty": b""}[damage])
    with pytest.raises(UserError, match=f"{damage}.safetensors"):
        read_state_dict(bad)
    rc, _, err = _run(["eval", "--recipe", TINY, "--checkpoint", str(bad), "--set", f"data.root={cfg.data.root}"],
                      capsys)
    assert rc == 2 and err.startswith(f"dino eval: error: checkpoint {bad} is not a readable safetensors file")
    assert len(err.splitlines()) == 1


def test_missing_and_mismatching_checkpoints(tiny_checkpoint, tmp_path):
    cfg, good = tiny_checkpoint
    with pytest.raises(UserError, match="nope.safetensors does not exist"):
        build_model_from_checkpoint(cfg.model, tmp_path / "nope.safetensors")
    cfg.model.transformer.dec_layers += 1
    try:
        with pytest.raises(UserError, match="does not fit this recipe's model: .* missing from the file"):
            build_model_from_checkpoint(cfg.model, good)
    finally:
        cfg.model.transformer.dec_layers -= 1
    assert read_categories(good) is None


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_checkpoint_of_another_model_counts_the_keys_and_names_its_recipe(command, tmp_path, capsys):
    from dino.engine.setup import weights_metadata

    cfg = load_recipe(TINY, [f"data.root={tmp_path / 'shapes'}"])
    path = tmp_path / "model.safetensors"
    save_weights(build_model(cfg.model).state_dict(), path, weights_metadata(cfg, []))
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    other = ["--set", f"data.root={tmp_path / 'shapes'}", "model.transformer.hidden_dim=32",
             "model.transformer.dec_layers=3", f"train.output_dir={tmp_path / 'out'}"]
    argv = {"eval": ["eval", "--recipe", TINY, "--checkpoint", str(path), *other],
            "predict": ["predict", str(image), "--recipe", TINY, "--checkpoint", str(path), "--device", "cpu",
                        "--output", str(tmp_path / "pred"), *other]}[command]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"dino {command}: error: checkpoint {path} does not fit this recipe's model: ")
    assert re.search(r"tensors expected, \d+ of another shape \(\S+ \(64,?[0-9, ]*\) vs \(32,?[0-9, ]*\), ", err)
    assert re.search(r"; \d+ missing from the file \(transformer\.decoder\.layers\.2\.", err)
    assert "; it was trained with recipe 'engine_tiny' (" in err
    assert "model.transformer.hidden_dim: 64 there, 32 here" in err and "model.transformer.dec_layers: 2 there, 3 here" in err
    assert err.endswith("); give the --recipe (and --set values) it was trained with\n")
    assert "--ignore-keys" not in err


def test_categories_metadata_is_read(tmp_path):
    path = tmp_path / "m.safetensors"
    save_weights({"w": torch.zeros(1)}, path, {"categories": json.dumps([{"id": 4, "name": "cat"}])})
    assert read_categories(path) == [{"id": 4, "name": "cat"}]
    save_weights({"w": torch.zeros(1)}, path, {"categories": "[{\"id\": 4}]"})
    with pytest.raises(UserError, match="categories"):
        read_categories(path)


TORCHVISION_RECIPE = """
from dino.config import Recipe
from dino.presets import get_preset


def recipe():
    # The tiny engine model on a torchvision ResNet-18 whose recipe asks for ImageNet weights, as the COCO recipes do.
    import sys
    sys.path.insert(0, {tests!r})
    from engine_tiny_recipe import recipe as tiny
    cfg = tiny()
    cfg.model.backbone.name = "resnet18"
    cfg.model.backbone.pretrained = "torchvision"
    return cfg
"""


def test_loading_a_checkpoint_never_downloads(tmp_path, monkeypatch, capsys):
    """eval, export (and bench) and predict of a checkpoint with backbone.pretrained="torchvision" and no network."""
    from dino_export.deploy_model import build_deploy_model

    recipe = tmp_path / "tv_recipe.py"
    recipe.write_text(textwrap.dedent(TORCHVISION_RECIPE.format(tests=str(REPO / "tests"))))
    data_root = tmp_path / "shapes"
    cfg = load_recipe(str(recipe), [f"data.root={data_root}"])
    fetched = []

    def no_network(self, *args, **kwargs):
        fetched.append(self.url)
        raise OSError(f"no network: tried to fetch {self.url}")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(OSError, match="no network"):  # the patch is where a fresh model would fetch
        build_model(cfg.model)
    fetched.clear()
    cfg.model.backbone.pretrained = None
    checkpoint = tmp_path / "model.safetensors"
    save_weights(build_model(cfg.model).state_dict(), checkpoint)

    overrides = ["--set", f"data.root={data_root}", f"train.output_dir={tmp_path / 'out'}"]
    rc, out, err = _run(["eval", "--recipe", str(recipe), "--checkpoint", str(checkpoint), *overrides], capsys)
    assert rc == 0, err
    assert "AP" in out
    image = next((data_root / "val").glob("*.png"))
    rc, _, err = _run(["predict", str(image), "--recipe", str(recipe), "--checkpoint", str(checkpoint), "--output",
                       str(tmp_path / "pred"), "--device", "cpu", *overrides], capsys)
    assert rc == 0, err
    model, desc = build_deploy_model(str(recipe), checkpoint)  # what dino export * and dino bench --checkpoint build
    assert "weights model.safetensors" in desc
    assert fetched == []


def test_the_error_line_is_one_write(monkeypatch):
    """The processes of a launch share stderr: a line written in two pieces (print's text, then its newline) was seen
    spliced with the other process's line."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    def fails(args):
        raise UserError("data.root /nowhere does not exist")

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert dino_cli._run(argparse.Namespace(func=fails), "dino train") == 2
    assert writes == ["dino train: error: data.root /nowhere does not exist\n"]
