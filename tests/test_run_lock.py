"""One writer per run folder: a second run into a busy folder stops at once naming the holder; a killed run's lock is
taken over; under accelerate launch only the main process takes it."""
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dino.data import generate_shapes_dataset
from dino.engine.recipe import load_recipe
from dino.engine.setup import build_model, fit_classes_to
from dino.engine.train import train
from dino.errors import UserError
from dino.run_lock import LOCK_FILE, run_lock
from dino.weights import save_weights
from dino_cli import main
from tests.launching import REPO, TINY, free_port, launch_command, launch_env, two_processes

HOST = socket.gethostname()


def _hold(folder, what, lock_file, ready, release):
    with run_lock(folder, what, lock_file=lock_file):
        ready.set()
        release.wait(120)


class Holder:
    """Another process holding ``folder``'s lock (forked: no second interpreter start-up)."""

    def __init__(self, folder, what="train.output_dir", lock_file=None):
        ctx = multiprocessing.get_context("fork")
        self.ready, self.release = ctx.Event(), ctx.Event()
        self.process = ctx.Process(target=_hold, args=(folder, what, lock_file, self.ready, self.release))
        self.process.start()
        assert self.ready.wait(60)
        self.pid = self.process.pid

    def kill(self):
        self.process.kill()
        self.process.join()

    def stop(self):
        self.release.set()
        self.process.join(60)


def busy(folder, what, pid):
    return (f"{what} {folder} is in use by another run (pid {pid} on {HOST}, started ", "); only one run may write a "
            f"folder: wait for that run to end (or stop it), or choose another {what}")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    d = load_recipe(TINY).data
    root = tmp_path_factory.mktemp("lock_data") / "shapes"
    return generate_shapes_dataset(root, d.shapes_train_images, d.shapes_val_images, d.shapes_image_size,
                                   seed=d.shapes_seed)


def test_a_busy_folder_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = Holder(folder)
    with pytest.raises(UserError) as err:
        with run_lock(folder, "train.output_dir"):
            pass
    start, end = busy(folder, "train.output_dir", holder.pid)
    assert str(err.value).startswith(start) and str(err.value).endswith(end), str(err.value)
    holder.kill()  # SIGKILL: its record stays behind
    assert json.loads((folder / ".dino-run.json").read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="dino"), run_lock(folder, "train.output_dir"):
        assert json.loads((folder / ".dino-run.json").read_text())["pid"] == os.getpid()
    assert (f"train.output_dir {folder}: took over the lock of run pid {holder.pid} on {HOST} (started "
            in caplog.text and "which ended without releasing it (killed?)" in caplog.text)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # the record goes with the run


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path, caplog, monkeypatch):
    # On a file system without flock the lock is a file that a killed run leaves behind; its record names a process
    # of this host that is gone, so the lock is taken over.
    folder = tmp_path / "run"
    holder = Holder(folder)
    holder.kill()
    dead = holder.pid
    stale = Holder(folder)  # holds the lock now, but its record is made to name the dead process
    (folder / ".dino-run.json").write_text(json.dumps({"pid": dead, "host": HOST, "started": "then"}))
    monkeypatch.setattr("dino.run_lock._RECORD_WAIT_S", 0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="dino"), run_lock(folder, "train.output_dir"):
            assert json.loads((folder / ".dino-run.json").read_text())["pid"] == os.getpid()
        assert f"took over the lock of run pid {dead} on {HOST} (started then)" in caplog.text
    finally:
        stale.stop()


def test_training_into_a_busy_folder_stops_before_writing_anything(data_root, tmp_path):
    out = tmp_path / "out"
    holder = Holder(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(UserError) as err:
            train(load_recipe(TINY, [f"data.root={data_root}", f"train.output_dir={out}"]))
        assert str(err.value).startswith(busy(out, "train.output_dir", holder.pid)[0])
        assert sorted(p.name for p in out.iterdir()) == before == [".dino-run.json", LOCK_FILE]
    finally:
        holder.stop()


def test_dino_eval_and_predict_into_a_busy_folder_are_refused(data_root, tmp_path, capsys):
    cfg = load_recipe(TINY, [f"data.root={data_root}"])
    from dino.data import build_dataset

    fit_classes_to(cfg, build_dataset(cfg.data, "val"))
    weights = tmp_path / "model.safetensors"
    save_weights(build_model(cfg.model, weights_follow=True).state_dict(), weights)
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (64, 64)).save(image)
    out = tmp_path / "out"
    holder = Holder(out)
    try:
        rc = main(["eval", "--recipe", TINY, "--checkpoint", str(weights), "--output-dir", str(out), "--set", f"data.root={data_root}"])
        assert rc == 2
        assert capsys.readouterr().err.strip().startswith("dino eval: error: " + busy(out, "--output-dir", holder.pid)[0])
        rc = main(["predict", "--recipe", TINY, "--checkpoint", str(weights), "--output", str(out), str(image),
                   "--set", f"data.root={data_root}"])
        assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dino predict: error: " + busy(out, "--output", holder.pid)[0]), err
        assert sorted(p.name for p in out.iterdir()) == [".dino-run.json", LOCK_FILE]
    finally:
        holder.stop()


def test_the_shapes_generator_refuses_a_data_root_another_run_is_generating(tmp_path):
    root = tmp_path / "shapes"
    holder = Holder(root, "data.root", lock_file=tmp_path / ".shapes.dino-run.lock")
    try:
        with pytest.raises(UserError, match=rf"^data\.root {root} is in use by another run \(pid {holder.pid} on "):
            generate_shapes_dataset(root, 2, 1, 64)
        assert not root.exists()
    finally:
        holder.stop()
    assert generate_shapes_dataset(root, 2, 1, 64) == root


@pytest.mark.slow
def test_two_runs_started_together_give_one_run_and_one_refusal(data_root, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dino_cli", "train", TINY, "--set", f"data.root={data_root}",
           f"train.output_dir={out}", "optim.epochs=1", "optim.lr_drop_epochs=1"]
    runs = [subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [run.communicate(timeout=600)[1] for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], errs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    start, end = busy(out, "train.output_dir", runs[winner].pid)
    last = errs[loser].strip().splitlines()[-1]
    assert last.startswith(f"dino train: error: {start}") and last.endswith(end), errs[loser]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]  # was [1, 1]: both runs trained into the folder


@pytest.mark.slow
def test_two_processes_take_the_lock_once(data_root, tmp_path):
    # If the second process also took the lock, it would find it held by the first and stop the launch (exit 2).
    out = tmp_path / "out"
    cmd = launch_command(*two_processes(free_port()), overrides=[f"data.root={data_root}", f"train.output_dir={out}",
                                                                 "optim.epochs=1", "optim.lr_drop_epochs=1"])
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "in use by another run" not in run.stderr and "took over" not in run.stderr
    assert (out / "model.safetensors").is_file() and not (out / ".dino-run.json").exists()
