"""A termination signal (SIGTERM, SIGUSR1) ends training with a checkpoint on every process at the same step and one
line; the rerun resumes. One process through `dino train`, two through `accelerate launch` (gloo), and the Slurm
script's signal path under stub `srun` and `scontrol`.

The runs use tests/engine_pause_recipe.py: each process waits after its first optimizer step until the test's signal
has reached it (or the test says go), so the stop step never depends on timing.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dino.config import parse_typed
from dino.engine.checkpoint import checkpoint_dirs, read_progress
from dino.engine.termination import TERMINATED_EXIT_CODE, TerminationSignals
from dino.errors import UserError
from tests.launching import REPO, TINY, free_port, launch_command, launch_env, two_processes

PAUSE = str(REPO / "tests" / "engine_pause_recipe.py")
SLURM_SCRIPT = REPO / "recipes" / "slurm_multinode.sh"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from dino.data import generate_shapes_dataset
    from dino.engine.recipe import load_recipe

    root = tmp_path_factory.mktemp("termination_data") / "shapes"
    d = load_recipe(TINY).data
    generate_shapes_dataset(root, d.shapes_train_images, d.shapes_val_images, d.shapes_image_size, seed=d.shapes_seed)
    return str(root)


def run_env() -> dict:
    """launch_env() on the PyTorch path of ms_deform_attn: these runs are about signals, and a run that finds the CPU
    kernel's build out of date would spend minutes compiling it before its first step."""
    return {**launch_env(), "DINO_DISABLE_KERNEL": "1"}


def overrides(data_root, out, *more) -> list[str]:
    # No periodic checkpoint: the one found after the signal can only be the termination's.
    return [f"data.root={data_root}", f"train.output_dir={out}", "train.checkpoint_every_steps=0", *more]


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun's workers run in sessions of their own: a process group misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def started():
    """Runs started by a test; whatever is left of them (a failing test's paused processes) is killed after it."""
    runs: list[subprocess.Popen] = []
    yield runs
    for proc in runs:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def start(started, cmd, tmp_path, log_name="log", env_extra=None) -> tuple[subprocess.Popen, Path]:
    """Starts ``cmd`` with its output in a file (a pipe nobody reads could fill and block the run)."""
    log = tmp_path / log_name
    env = {**run_env(), **(env_extra or {})}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    started.append(proc)
    return proc, log


def pause_env(folder: Path, **extra) -> dict:
    folder.mkdir(exist_ok=True)
    return {"DINO_PAUSE_DIR": str(folder), "DINO_PAUSE_STEP": "1", **extra}


def wait_for(paths, proc, log, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(Path(p).exists() for p in paths):
        assert proc.poll() is None, f"exited with {proc.returncode} before {paths}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {paths}\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def finish(proc, log, timeout=300) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def terminated_lines(text: str, prefix: str) -> list[str]:
    marker = f"{prefix}: terminated by "
    return [line[line.index(marker):] for line in text.splitlines() if marker in line]


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    differing = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differing, f"{a} vs {b}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def test_termination_signals_are_checked_and_leave_ctrl_c_alone():
    assert parse_typed("SIGTERM,SIGUSR2", tuple[str, ...]) == ("SIGTERM", "SIGUSR2")
    for bad in ("SIGKILL", "SIGTREM", "TERM"):
        with pytest.raises(UserError, match=rf"train.termination_signals: '{bad}' is not a signal that can be caught"):
            TerminationSignals([bad])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with TerminationSignals(("SIGTERM", "SIGUSR1")) as termination:
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]  # Ctrl-C: still KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal is ignored: the first one names the stop
        assert termination.received == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_sigterm_at_an_epoch_end_saves_once_a_second_signal_does_not_break_it_and_the_rerun_resumes(
        data_root, tmp_path, started):
    out, pause = tmp_path / "out", tmp_path / "pause"
    # One process, 2 micro-batches per step, one step per epoch (of the loader's 4 micro-batches), 2 epochs: the
    # signal after step 1 is agreed at the fetch after the epoch's last step, so the run stops at the epoch's end.
    cmd = [sys.executable, "-m", "dino_cli", "train", PAUSE, "--set",
           *overrides(data_root, out, "train.max_steps_per_epoch=1")]
    # 1. SIGTERM after step 1; a second SIGTERM while the (epoch-end) checkpoint's weights are being written.
    run, log = start(started, cmd, tmp_path, env_extra=pause_env(pause, DINO_PAUSE_SAVE="1"))
    wait_for([pause / "paused_0"], run, log)
    run.send_signal(signal.SIGTERM)
    wait_for([pause / "saving"], run, log)
    run.send_signal(signal.SIGTERM)
    (pause / "go_save").touch()
    text = finish(run, log)
    assert run.returncode == TERMINATED_EXIT_CODE == 75, text[-4000:]
    checkpoint = out / "checkpoints" / "step_00000001_end"
    assert text.splitlines()[-1] == (f"dino train: terminated by SIGTERM at step 1; saved {checkpoint}; "
                                     "rerun the same command to resume")
    assert checkpoint_dirs(out) == [checkpoint]  # the epoch-end checkpoint, not saved a second time as step_00000001
    progress = read_progress(checkpoint)
    assert (progress["epoch"], progress["batches_in_epoch"], progress["global_step"]) == (1, 0, 1)
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]

    # 2. The rerun is killed (SIGKILL) while writing its next checkpoint: that folder is never a checkpoint.
    # Both of part 1's files go: a `go_save` left behind would let this save finish before the SIGKILL arrives.
    (pause / "saving").unlink()
    (pause / "go_save").unlink()
    run, log = start(started, cmd, tmp_path, "log2", env_extra={"DINO_PAUSE_DIR": str(pause), "DINO_PAUSE_SAVE": "1"})
    wait_for([pause / "saving"], run, log)
    run.send_signal(signal.SIGKILL)
    finish(run, log)
    assert checkpoint_dirs(out) == [checkpoint]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == [".tmp-step_00000002_end"]

    # 3. The next rerun resumes from step 1 and finishes (2 steps), leaving no half-written folder.
    done = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {checkpoint}: epoch 2, batch 0, step 1" in done.stderr
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000001_end", "step_00000002_end"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """Output folder of the 2-process run never signalled (a checkpoint at every step, all kept)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    cmd = launch_command(*two_processes(free_port()), recipe=PAUSE,
                         overrides=[f"data.root={data_root}", f"train.output_dir={out}", "train.keep_checkpoints=4"])
    run = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_one_checkpoint_and_the_rerun_equals_an_uninterrupted_run(
        data_root, uninterrupted, tmp_path, started):
    out, pause = tmp_path / "out", tmp_path / "pause"
    # A data worker is in its process's group, which torchrun signals: it must not die of it (the main process
    # decides). The rerun loads in the main process again (data.num_workers is run control).
    cmd = launch_command(*two_processes(free_port()), recipe=PAUSE,
                         overrides=overrides(data_root, out, "data.num_workers=1"))
    run, log = start(started, cmd, tmp_path, env_extra=pause_env(pause))
    wait_for([pause / "paused_0", pause / "paused_1"], run, log)
    run.send_signal(signal.SIGTERM)  # torchrun's agent sends it on to each process's group
    text = finish(run, log)
    assert run.returncode == 128 + signal.SIGTERM, text[-4000:]  # accelerate launch: 128 + the signal it got
    checkpoint = out / "checkpoints" / "step_00000001"
    line = f"launch.py: terminated by SIGTERM at step 1; saved {checkpoint}; rerun the same command to resume"
    assert terminated_lines(text, "launch.py") == [line, line], text[-4000:]  # one from each process
    assert checkpoint_dirs(out) == [checkpoint]
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert_same_tensors(checkpoint / "model.safetensors", uninterrupted / "checkpoints" / "step_00000001" /
                        "model.safetensors")

    rerun = subprocess.run(launch_command(*two_processes(free_port()), recipe=PAUSE,
                                          overrides=overrides(data_root, out)),
                           cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert_same_tensors(out / "model.safetensors", uninterrupted / "model.safetensors")  # bit for bit on the CPU


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(data_root, uninterrupted, tmp_path, started):
    out, pause = tmp_path / "out", tmp_path / "pause"
    cmd = launch_command(*two_processes(free_port()), recipe=PAUSE, overrides=overrides(data_root, out))
    run, log = start(started, cmd, tmp_path, env_extra=pause_env(pause))
    wait_for([pause / "paused_0", pause / "paused_1"], run, log)
    os.kill(int((pause / "paused_1").read_text()), signal.SIGTERM)
    (pause / "go").touch()  # process 0 goes on without a signal; the next micro-batch's all-reduce tells it
    text = finish(run, log)
    # Both processes exit with 75; torchrun reports that as a failed child (its own traceback) and accelerate exits 1.
    assert run.returncode == 1, text[-4000:]
    assert "exitcode  : 75" in text
    checkpoint = out / "checkpoints" / "step_00000001"
    line = f"launch.py: terminated by SIGTERM at step 1; saved {checkpoint}; rerun the same command to resume"
    assert terminated_lines(text, "launch.py") == [line, line], text[-4000:]
    assert checkpoint_dirs(out) == [checkpoint]
    assert_same_tensors(checkpoint / "model.safetensors", uninterrupted / "checkpoints" / "step_00000001" /
                        "model.safetensors")


STUBS = {
    # srun: logs its call and runs the command after its options in its place, so that a signal to it reaches the
    # launcher as real srun forwards it to its tasks (`bash -c "accelerate launch ..."` execs accelerate).
    "srun": 'echo "srun $*" >> "$STUB_LOG"\nwhile [[ "$1" == -* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n',
    "scontrol": 'echo "scontrol $*" >> "$STUB_LOG"\n[[ "$1 $2" == "show hostnames" ]] && echo 127.0.0.1\nexit 0\n',
}


@pytest.mark.slow
def test_slurm_script_forwards_usr1_saves_and_requeues_and_the_requeued_job_resumes(
        data_root, uninterrupted, tmp_path, started):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    out, pause, calls = tmp_path / "out", tmp_path / "pause", tmp_path / "calls"
    env = {"PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}", "STUB_LOG": str(calls),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "GPUS_PER_NODE": "2",
           "MAIN_PROCESS_PORT": str(free_port())}
    cmd = ["bash", str(SLURM_SCRIPT), PAUSE, "--set", *overrides(data_root, out)]
    job, log = start(started, cmd, tmp_path, env_extra={**env, **pause_env(pause)})
    wait_for([pause / "paused_0", pause / "paused_1"], job, log)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@<grace> sends the batch shell before the time limit
    text = finish(job, log)
    assert job.returncode == 0, text[-4000:]
    checkpoint = out / "checkpoints" / "step_00000001"
    line = f"launch.py: terminated by SIGUSR1 at step 1; saved {checkpoint}; rerun the same command to resume"
    assert terminated_lines(text, "launch.py") == [line, line], text[-4000:]
    assert checkpoint_dirs(out) == [checkpoint]
    assert calls.read_text().splitlines()[-1] == "scontrol requeue 4242"

    # The requeued job runs the same script and arguments: it resumes, finishes and does not requeue again.
    calls.unlink()
    env["MAIN_PROCESS_PORT"] = str(free_port())
    job, log = start(started, cmd, tmp_path, "log2", env_extra=env)
    text = finish(job, log)
    assert job.returncode == 0, text[-4000:]
    assert [c.split()[:2] for c in calls.read_text().splitlines()] == [["scontrol", "show"],
                                                                      ["srun", "--kill-on-bad-exit=1"]]  # no requeue
    assert_same_tensors(out / "model.safetensors", uninterrupted / "model.safetensors")


UNCLOSED_LOADER = """
import sys
from torch.utils.data import DataLoader
from dino.engine.termination import data_worker_init

loader = DataLoader(list(range(64)), batch_size=1, num_workers=2, worker_init_fn=data_worker_init(["SIGTERM"]))
left_open = iter(loader)  # never closed: as when a failed run's traceback holds its loader until exit
next(left_open)
print("fetched", flush=True)
"""


def test_a_process_with_an_unclosed_loader_still_exits():
    """multiprocessing's exit hook ends daemonic children with SIGTERM and waits for them: workers that ignored every
    SIGTERM kept the process from ever ending (a CI run hung this way after its tests). They now end on their
    parent's SIGTERM (or, without sigwaitinfo, data_worker_init's exit hook kills them first)."""
    run = subprocess.run([sys.executable, "-c", UNCLOSED_LOADER], cwd=REPO, env=launch_env(), capture_output=True,
                         text=True, timeout=120)
    assert (run.returncode, run.stdout) == (0, "fetched\n"), run.stderr[-2000:]


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return os.getpid()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo (the worker tells the senders apart)")
def test_a_data_worker_drops_others_signals_and_ends_on_its_parents():
    """torchrun and Slurm signal the workers too: they must keep serving. The main process ending its workers (the
    DataLoader's shutdown, multiprocessing at exit) must end them: ignoring that too left them alive for good."""
    from torch.utils.data import DataLoader

    from dino.engine.termination import data_worker_init

    loader = DataLoader(_Pids(), batch_size=1, num_workers=1, worker_init_fn=data_worker_init(["SIGTERM", "SIGUSR1"]))
    batches = iter(loader)
    worker = int(next(batches))
    for name in ("TERM", "USR1"):
        subprocess.run(["kill", f"-{name}", str(worker)], check=True)  # sent by another process
    time.sleep(0.5)
    assert _alive(worker) and all(int(next(batches)) == worker for _ in range(5))
    os.kill(worker, signal.SIGTERM)  # sent by its parent
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)
    del batches
