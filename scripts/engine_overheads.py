"""Per-step costs of two engine choices, on the CPU (gloo); prints figures for docs/training.md.

1. The non-finite agreement: one all-reduce of one number + reading it back, between 2 processes.
2. DDP's ``find_unused_parameters=True``: the autograd-graph search it adds to every forward, measured as the
   forward time of the engine's tiny model under DDP with True vs False (1 process), interleaved, median of N.

    PYTHONPATH=. python scripts/engine_overheads.py [--steps 1000] [--forwards 30]
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agreement(rank: int, world: int, port: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    flag = torch.zeros(1)
    for _ in range(20):  # warm-up
        dist.all_reduce(flag)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        count = torch.tensor([0.0])
        dist.all_reduce(count)
        count.item()
        times.append(time.perf_counter() - started)
    if rank == 0:
        queue.put((statistics.median(times) * 1e3, sorted(times)[int(0.9 * len(times))] * 1e3))
    dist.destroy_process_group()


def _find_unused(forwards: int) -> dict[bool, float]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dino import build_model
    from dino.criterion import build_criterion
    from dino.engine.recipe import load_recipe
    from dino.data import build_dataset, collate_fn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_recipe(str(Path(__file__).resolve().parents[1] / "tests" / "engine_tiny_recipe.py"),
                      ["data.root=/tmp/dino_engine_overheads/shapes"])
    dataset = build_dataset(cfg.data, "train")
    images, mask, targets = collate_fn([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model)
    # One copy per wrapper: two DDP wrappers of one module would both hook its parameters.
    wrapped = {flag: DDP(copy.deepcopy(model), find_unused_parameters=flag) for flag in (False, True)}
    times = {False: [], True: []}
    for i in range(forwards + 3):
        for flag in (False, True):
            torch.manual_seed(i)
            started = time.perf_counter()
            out = wrapped[flag](images, mask, targets)
            elapsed = time.perf_counter() - started
            losses = criterion(out, targets)  # the training loss: every output (aux, interm, dn) takes part
            sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
            wrapped[flag].zero_grad()
            if i >= 3:
                times[flag].append(elapsed)
    dist.destroy_process_group()
    return {flag: statistics.median(t) * 1e3 for flag, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--forwards", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_agreement, args=(2, _port(), args.steps, queue), nprocs=2)
    median, p90 = queue.get()
    print(f"non-finite agreement (all-reduce of 1 number + .item(), 2 gloo processes): median {median:.3f} ms, "
          f"p90 {p90:.3f} ms per micro-batch")
    ms = _find_unused(args.forwards)
    print(f"DDP forward of the tiny engine model (1 process, gloo): find_unused_parameters=False {ms[False]:.1f} ms, "
          f"True {ms[True]:.1f} ms (difference {ms[True] - ms[False]:+.1f} ms per step)")


if __name__ == "__main__":
    main()
