"""Multi-process runs through `accelerate launch` on the CPU (gloo): sharded training, gathered evaluation, 2 machines."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.launching import REPO, TINY, free_port, launch_command, launch_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from dino.data import generate_shapes_dataset
    from dino.engine.recipe import load_recipe

    root = tmp_path_factory.mktemp("dist_data") / "shapes"
    d = load_recipe(TINY).data
    # Generated once here so concurrent processes never race to create it.
    generate_shapes_dataset(root, d.shapes_train_images, d.shapes_val_images, d.shapes_image_size, seed=d.shapes_seed)
    return str(root)


def test_two_processes_train_and_evaluate_every_val_image_once(data_root, tmp_path):
    out = tmp_path / "out"
    cmd = launch_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                         overrides=[f"data.root={data_root}", f"train.output_dir={out}", "optim.epochs=1",
                                    "optim.lr_drop_epochs=1", "train.eval_every_epochs=1"])
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "effective batch 4 = 2 per device x 2 process(es) x 1 gradient-accumulation step(s)" in run.stderr
    # 5 val images over 2 processes x 2 per batch: Accelerate pads the shards; the gather drops the repeats.
    results = json.loads((out / "eval" / "epoch_001" / "results.json").read_text())
    assert results["num_images"] == 5
    predictions = json.loads((out / "eval" / "epoch_001" / "predictions.json").read_text())
    val_ids = {img["id"] for img in json.loads((Path(data_root) / "annotations" / "val.json").read_text())["images"]}
    assert {p["image_id"] for p in predictions} == val_ids
    per_image = {i: sum(p["image_id"] == i for p in predictions) for i in val_ids}
    assert set(per_image.values()) == {20}  # num_select per image: nothing duplicated or lost
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["global_step"] == 2 and log[-1]["eval"]["num_images"] == 5  # 8 images / effective batch 4
    # steps.jsonl: the main process alone writes it, so each step is there once (two writers would give 1, 1, 2, 2).
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in steps] == [(1, 1), (2, 1)] and all(r["loss"] > 0 for r in steps)
    assert (out / "model.safetensors").is_file()
    states = sorted((out / "checkpoints" / "step_00000002_end").glob("random_states_*.pkl"))
    assert [p.name for p in states] == ["random_states_0.pkl", "random_states_1.pkl"]
    # Official per-process seeds (seed + rank): the processes draw different denoising noise.
    rng = [torch.load(p, weights_only=False)["torch_manual_seed"] for p in states]
    assert not torch.equal(rng[0], rng[1])


def test_a_nan_on_one_process_stops_both_at_once_with_the_same_message(data_root, tmp_path):
    # Process 1's box loss is NaN at step 2; process 0's is finite. Both must raise the same error at step 2, long
    # before the collective timeout (600 s) would end a process waiting for the other.
    out = tmp_path / "out"
    cmd = launch_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                         overrides=[f"data.root={data_root}", f"train.output_dir={out}",
                                    "train.checkpoint_every_steps=0", "train.process_group_timeout_s=600"],
                         recipe=str(REPO / "tests" / "engine_nan_recipe.py"))
    started = time.monotonic()
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=400)
    elapsed = time.monotonic() - started
    assert run.returncode != 0
    marker = "NonFiniteStepError: "
    errors = [line[line.index(marker):] for line in run.stderr.splitlines() if marker in line]  # torchrun may prefix
    assert len(errors) >= 2 and len(set(errors)) == 1, run.stderr[-3000:]  # both processes, one message
    assert re.match(r"NonFiniteStepError: non-finite loss at step 2 \(epoch 1\): "
                    r"process 0: finite \(image ids \[\d+, \d+\]\); process 1: loss=nan, loss_bbox=nan "
                    r"\(image ids \[\d+, \d+\]\)", errors[0]), errors[0]
    assert elapsed < 300, f"took {elapsed:.0f} s"


def test_two_machines_on_loopback_complete_training(data_root, tmp_path):
    out = tmp_path / "out"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = launch_command("--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                             "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                             overrides=[f"data.root={data_root}", f"train.output_dir={out}", "optim.epochs=1",
                                        "optim.lr_drop_epochs=1", "train.checkpoint_every_steps=0",
                                        "train.eval_every_epochs=1"])
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-2000:] for log in logs)
    assert "2 process(es)" in logs[0]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["global_step"] == 2 and record["eval"]["num_images"] == 5


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_dead_worker_makes_the_other_exit_with_an_error(data_root, tmp_path):
    # Machine 1's worker dies mid-training; machine 0 must fail (not hang) within the test's timeout.
    out = tmp_path / "out"
    port = str(free_port())
    common = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    overrides = [f"data.root={data_root}", f"train.output_dir={out}", "optim.epochs=5000", "optim.lr_drop_epochs=5000",
                 "train.checkpoint_every_steps=0", "train.process_group_timeout_s=30"]
    main = subprocess.Popen(launch_command(*common, "--machine_rank", "0", overrides=overrides), cwd=REPO,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = subprocess.Popen(launch_command(*common, "--machine_rank", "1", overrides=overrides), cwd=REPO,
                              env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = out / "log.jsonl"
        deadline = time.monotonic() + 240
        while not log.exists() and time.monotonic() < deadline and main.poll() is None:
            time.sleep(0.5)
        assert log.exists(), "training never completed an epoch"
        # torchrun starts workers in their own sessions: kill machine 1's worker processes, then its launcher.
        for pid in _children(worker.pid):
            os.kill(pid, signal.SIGKILL)
        worker.kill()
        output = main.communicate(timeout=120)[0]
        assert main.returncode != 0, output[-2000:]
        assert len(log.read_text().splitlines()) < 5000
    finally:
        for p in (main, worker):
            if p.poll() is None:
                for pid in _children(p.pid):
                    os.kill(pid, signal.SIGKILL)
                p.kill()
