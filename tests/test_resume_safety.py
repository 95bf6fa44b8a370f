"""Resuming reads a checkpoint folder as data: a file made to run code never runs, an unusable file is one line.

Every file of a checkpoint is replaced in turn by a pickle whose ``__reduce__`` creates a marker file (as a bare
pickle and inside torch.save's zip) and by a truncated copy of itself; the resume must refuse it with the line
``cannot resume from <folder>: <file> is not a valid <what> (...); ...`` and the marker must never appear.
"""
import logging
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dino.data import build_dataset
from dino.engine.batching import plan_batches
from dino.engine.checkpoint import latest_checkpoint
from dino.engine.optim import build_optimizer, build_scheduler
from dino.engine.recipe import load_recipe
from dino.engine.restore import restore
from dino.engine.setup import build_accelerator, build_model, fit_classes_to
from dino.engine.train import build_ema, train
from dino.errors import UserError
from dino.weights import save_weights
from dino_cli import main

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
EMA = ("train.ema=true", "train.ema_decay=0.5")

# file -> the <what> of its error line
FILES = {
    "progress.json": "progress record",
    "model.safetensors": "model weights file",
    "model_ema.safetensors": "EMA weights file",
    "ema.json": "EMA state",
    "scheduler.json": "LR scheduler state",
    "optimizer.bin": "optimizer state",
    "random_states_0.pkl": "RNG state",
}


class Marker:
    """Unpickling this creates ``path``: proof that the file was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def tiny(root, out, *overrides):
    return load_recipe(TINY, [f"data.root={root / 'shapes'}", f"train.output_dir={out}", *EMA, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint after one step (EMA on) and freshly built training objects to restore it into."""
    root = tmp_path_factory.mktemp("resume_safety")
    train(tiny(root, root / "out", "train.max_steps=1"))
    cfg = tiny(root, root / "out")
    accelerator = build_accelerator(cfg)
    fit_classes_to(cfg, build_dataset(cfg.data, "train"))
    model = build_model(cfg.model, weights_follow=True)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    plan = plan_batches(cfg.optim.total_batch_size, accelerator.num_processes, cfg.optim.batch_size_per_device)
    return SimpleNamespace(root=root, checkpoint=latest_checkpoint(root / "out"), cfg=cfg, accelerator=accelerator,
                           plan=plan, model=model, optimizer=optimizer, scheduler=scheduler,
                           ema=build_ema(accelerator, model, cfg))


def _restore(run, checkpoint, resume_anyway=False):
    return restore(run.accelerator, checkpoint, run.plan, run.model, run.optimizer, run.scheduler, run.ema, run.cfg,
                   {}, resume_anyway)


def _copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run.checkpoint, tmp_path / "checkpoints" / run.checkpoint.name))


def _malicious(path: Path, form: str, marker: Path) -> None:
    if form == "pickle":
        path.write_bytes(pickle.dumps(Marker(marker)))
    else:
        torch.save({"state": Marker(marker)}, path)


def test_the_checkpoint_holds_no_accelerate_custom_pickle(run):
    names = sorted(p.name for p in run.checkpoint.iterdir())
    assert names == ["ema.json", "model.safetensors", "model_ema.safetensors", "optimizer.bin", "progress.json",
                     "random_states_0.pkl", "scheduler.json"]


@pytest.mark.parametrize("form", ["pickle", "torch.save", "truncated"])
@pytest.mark.parametrize("name", FILES)
def test_every_file_malicious_or_corrupt_is_one_line_and_never_runs(run, tmp_path, name, form):
    checkpoint = _copy(run, tmp_path)
    marker = tmp_path / "marker"
    if form == "truncated":
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
    else:
        _malicious(checkpoint / name, form, marker)
    with pytest.raises(UserError) as err:
        _restore(run, checkpoint)
    message = str(err.value)
    assert message.startswith(f"cannot resume from {checkpoint}: {name} is not a valid {FILES[name]} ("), message
    assert "\n" not in message
    if name == "model.safetensors":
        assert message.endswith("; the file is damaged or was not written by dino: start over in another "
                                "train.output_dir")
    elif name == "random_states_0.pkl":
        assert "pass --resume-anyway to go on without it" in message
    else:
        assert f"start a new run from its weights with --finetune-from {checkpoint / 'model.safetensors'}" in message
    if form != "truncated":
        refused = re.search(r"\(UnpicklingError: (Unsupported global: GLOBAL \w+\.open|Unsupported operand)", message)
        assert refused or name.endswith((".json", ".safetensors")), message
    assert not marker.exists()


def test_an_unreadable_rng_state_with_resume_anyway_is_logged_and_the_rest_restored(run, tmp_path, caplog):
    checkpoint = _copy(run, tmp_path)
    _malicious(checkpoint / "random_states_0.pkl", "pickle", tmp_path / "marker")
    with torch.no_grad():
        for p in run.model.parameters():
            p.zero_()
    with caplog.at_level(logging.WARNING, logger="dino.engine"):
        progress = _restore(run, checkpoint, resume_anyway=True)
    assert progress.global_step == 1
    assert ("the RNG state was not restored (--resume-anyway): cannot resume from "
            f"{checkpoint}: random_states_0.pkl is not a valid RNG state (UnpicklingError") in caplog.text
    saved, got = load_file(str(checkpoint / "model.safetensors")), run.model.state_dict()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert not (tmp_path / "marker").exists()


def test_files_a_checkpoint_does_not_use_are_never_read(run, tmp_path):
    checkpoint = _copy(run, tmp_path)
    for i, name in enumerate(["sampler.bin", "dl_state_dict.bin", "custom_checkpoint_0.pkl", "scaler.pt"]):
        _malicious(checkpoint / name, "pickle", tmp_path / f"marker{i}")
    assert _restore(run, checkpoint).global_step == 1
    assert not list(tmp_path.glob("marker*"))


def _legacy(run, tmp_path) -> Path:
    """The checkpoint as written before scheduler.json: Accelerate's custom-object pickles of the scheduler and EMA."""
    checkpoint = _copy(run, tmp_path)
    _restore(run, run.checkpoint)
    torch.save(run.scheduler.state_dict(), checkpoint / "custom_checkpoint_0.pkl")
    torch.save(run.ema.state_dict(), checkpoint / "custom_checkpoint_1.pkl")
    (checkpoint / "scheduler.json").unlink()
    (checkpoint / "ema.json").unlink()
    return checkpoint


def test_a_checkpoint_from_before_the_change_resumes_read_safely(run, tmp_path):
    checkpoint = _legacy(run, tmp_path)
    expected_ema = {k: v.clone() for k, v in run.ema.state_dict().items()}
    expected_scheduler = run.scheduler.state_dict()
    with torch.no_grad():
        for p in run.ema.parameters():
            p.zero_()
    run.ema.n_averaged.zero_()
    run.scheduler.last_epoch = 7
    assert _restore(run, checkpoint).global_step == 1
    assert run.scheduler.state_dict() == expected_scheduler
    got = run.ema.state_dict()
    assert all(torch.equal(got[k], expected_ema[k]) for k in expected_ema) and int(run.ema.n_averaged) == 1


@pytest.mark.parametrize("name,what", [("custom_checkpoint_0.pkl", "LR scheduler state"),
                                       ("custom_checkpoint_1.pkl", "EMA state")])
def test_an_old_checkpoints_custom_pickle_never_runs(run, tmp_path, name, what):
    checkpoint = _legacy(run, tmp_path)
    _malicious(checkpoint / name, "torch.save", tmp_path / "marker")
    with pytest.raises(UserError, match=rf"^cannot resume from .*: {name} is not a valid {what} \(UnpicklingError: "
                                        r"Unsupported global: GLOBAL \w+\.open"):
        _restore(run, checkpoint)
    assert not (tmp_path / "marker").exists()


def test_dino_train_refuses_a_malicious_checkpoint_with_one_line_and_exit_2(run, tmp_path, capsys):
    checkpoint = _copy(run, tmp_path)
    marker = tmp_path / "marker"
    _malicious(checkpoint / "optimizer.bin", "torch.save", marker)
    rc = main(["train", TINY, "--resume", str(checkpoint), "--set", f"data.root={run.root / 'shapes'}",
               f"train.output_dir={tmp_path / 'out'}", *EMA])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not marker.exists()
    assert re.match(rf"dino train: error: cannot resume from {re.escape(str(checkpoint))}: optimizer.bin is not a "
                    r"valid optimizer state \(UnpicklingError: Unsupported global: GLOBAL \w+\.open", err[-1]), err
    assert not list((tmp_path / "out").glob("checkpoints/*"))


def test_files_of_another_model_are_refused_naming_what_differs(run, tmp_path):
    checkpoint = _copy(run, tmp_path)
    weights = load_file(str(checkpoint / "model.safetensors"))
    dropped = sorted(weights)[0]
    save_weights({k: v for k, v in weights.items() if k != dropped}, checkpoint / "model.safetensors")
    with pytest.raises(UserError, match=rf"model.safetensors is not a valid model weights file \(does not fit the "
                                        rf"recipe's model: 1 tensor\(s\) missing, e.g. {re.escape(dropped)}\); "):
        _restore(run, checkpoint)
    checkpoint = _copy(run, tmp_path / "2")
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    sizes = [len(g["params"]) for g in state["param_groups"]]
    state["param_groups"] = state["param_groups"][:1]
    torch.save(state, checkpoint / "optimizer.bin")
    with pytest.raises(UserError, match=rf"optimizer.bin is not a valid optimizer state \(parameter groups of "
                                        rf"\[{sizes[0]}\] parameters, the recipe's model has \[{sizes[0]}, "):
        _restore(run, checkpoint)
