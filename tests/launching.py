"""Helpers for tests that start several processes through `accelerate launch` on the CPU (gloo)."""
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "engine_tiny_recipe.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    """This environment with one thread per process and gloo on the loopback (no inherited RANK)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


# `--multi_gpu` selects torchrun, which also runs CPU processes (gloo); `--cpu` alone would start only one process
# (Accelerate runs several CPU processes only through MPI). No train.cpu=true: the engine must find out itself that the
# processes share no GPU (on a GPU machine they would use the GPUs).
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]


def launch_command(*accelerate_args, overrides=(), recipe=TINY) -> list[str]:
    """``accelerate launch ... launch.py RECIPE --set OVERRIDES`` as an argument list."""
    return [*ACCELERATE_LAUNCH, *accelerate_args, "launch.py", recipe, "--set", *overrides]


def two_processes(port: int) -> list[str]:
    """The accelerate arguments of 2 processes on this machine."""
    return ["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port)]
