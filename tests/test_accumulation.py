"""Gradient accumulation equals more processes: 1 process x 2 accumulated micro-batches takes the same step as
2 processes x 1 micro-batch (gloo), with micro-batches of different box counts (3 and 7), so that each micro-batch
must be normalised by the box count of the whole group as the official criterion does across GPUs."""
import subprocess
import sys

import pytest
import torch

from dino.criterion import num_boxes_per_micro_batch
from tests.accumulation_worker import BOXES, micro_batches, step_gradient

from tests.launching import REPO, free_port, launch_env


def test_the_group_box_count_is_averaged_over_its_micro_batches():
    targets = [t for _, _, t in micro_batches()]
    assert [sum(len(x["labels"]) for x in t) for t in targets] == [sum(b) for b in BOXES] == [3, 7]
    assert num_boxes_per_micro_batch(targets, torch.device("cpu")) == 5.0
    assert num_boxes_per_micro_batch(targets[:1], torch.device("cpu")) == 3.0
    assert num_boxes_per_micro_batch([[{"labels": torch.zeros(0)}]] * 2, torch.device("cpu")) == 1.0  # at least 1


@pytest.mark.slow
def test_one_process_accumulating_two_micro_batches_steps_like_two_processes(tmp_path):
    single = step_gradient(str(tmp_path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "tests/accumulation_worker.py", str(tmp_path / "two")]
    (tmp_path / "two").mkdir()
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "grad.pt")
    assert single.dtype == two.dtype == torch.float64 and single.shape == two.shape
    error = ((single - two).norm() / two.norm()).item()
    print(f"1 process x 2 micro-batches vs 2 processes x 1: relative gradient error {error:.3g}")
    assert error <= 1e-10
