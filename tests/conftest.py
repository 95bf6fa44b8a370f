"""Shared pytest setup: GPU and TensorRT tests skip cleanly where their hardware or library is missing."""
import argparse
import importlib.util
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.data._utils.signal_handling as loader_signals
from filelock import FileLock

from tests.official_weights import official_state_dict


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores for PyTorch's (and its children's) threads: two
    workers of two threads each on the 2-core machine spend their time in OpenMP's spin-waits."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


# The files that take longest, longest first (docs/testing.md, "Where the time goes"). Under pytest-xdist's
# -n 2 --dist loadfile --no-loadscope-reorder (docs/testing.md; not make test's command yet) a file's tests stay on
# one worker, so its module fixtures are made once, and a worker that runs dry takes the next file in this order, so
# no long file is started last.
LONGEST_FILES = ("test_swinl_parity.py", "test_export_onnx.py", "test_gpu_check.py", "test_export_check_reference.py",
                 "test_export_cli.py", "test_training_golden.py", "test_engine_termination.py", "test_export_aoti.py",
                 "test_export_int8.py", "test_convert.py", "test_engine_train.py", "test_wheel.py",
                 "test_openvino_extension.py", "test_data_unreadable.py", "test_engine_distributed.py")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    no_trt = pytest.mark.skip(reason="needs the `tensorrt` Python package, which is not installed")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(no_trt)


# The official goldens (shared/parity) were made where Intel MKL takes its generic code path. On an Intel CPU MKL's
# own paths round float32 log and exp differently (e.g. 424 vs 74,299 of 1e6 float32 logs not correctly rounded), and
# the official model computes its proposals and sine embeddings in float32: measured on a 2-core Xeon (AMX), the R50
# golden outputs then differ by 2.8e-7 (MKL_CBWR=AVX2: 1.5e-7), far past the 1e-10 the goldens are held to, before
# any change of ours. MKL_CBWR=COMPATIBLE pins the generic path on every CPU (it passes there), but MKL reads it only
# when it loads and it makes float32 GEMM about 3x slower, so only `golden` tests run under it, in a child pytest.
GOLDEN_MKL = "COMPATIBLE"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A ``golden`` test runs in a child pytest with ``MKL_CBWR=COMPATIBLE`` unless this process already has it; the
    child's verdict is the test's (its output tail in the failure)."""
    if pyfuncitem.get_closest_marker("golden") is None or os.environ.get("MKL_CBWR") == GOLDEN_MKL:
        return None
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", pyfuncitem.nodeid]
    child = subprocess.run(cmd, cwd=pyfuncitem.config.rootpath, env={**os.environ, "MKL_CBWR": GOLDEN_MKL},
                           capture_output=True, text=True, timeout=3600)
    if child.returncode != 0:
        tail = "\n".join((child.stdout + child.stderr).splitlines()[-40:])
        pytest.fail(f"{pyfuncitem.nodeid} under MKL_CBWR={GOLDEN_MKL} (child pytest, exit {child.returncode}):\n{tail}",
                    pytrace=False)
    return True


@pytest.fixture(autouse=True)
def _sigchld_as_found():
    """Each test leaves SIGCHLD's handler as it found it. A DataLoader with workers installs torch's SIGCHLD handler
    for the rest of the process; then every child that any later test starts and waits for delivers a signal to this
    process. On the 2-core Xeon (AMX) VM, pytest then died of a SIGSEGV from the kernel itself (si_code SI_KERNEL:
    a signal frame it could not deliver) while waiting for a child, at the same test of each run (a core dump: the
    main thread in waitpid, torch's handler installed), CI included. Clearing the flag lets the next loader with
    workers install its handler again."""
    before = signal.getsignal(signal.SIGCHLD)
    yield
    if signal.getsignal(signal.SIGCHLD) is not before:
        signal.signal(signal.SIGCHLD, before)
        loader_signals._SIGCHLD_handler_set = False


def pytest_sessionfinish(session, exitstatus):
    """No multiprocessing child outlives the session: multiprocessing's exit hook waits for every one of them, so a
    leaked child that ignores SIGTERM (a data worker) would keep pytest from exiting after its summary, as a CI run
    once did for an hour. Each one left is named and killed."""
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
        child.join(10)
    if children:
        session.config.get_terminal_writer().line(
            f"conftest: killed {len(children)} leftover child process(es): {', '.join(map(str, children))}", yellow=True)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder ``name``, filled by ``make(folder)`` once per run. Under pytest-xdist the workers share it: the
    first to ask makes it under a file lock, the others wait and read it, so a session cost is paid once, not once per
    worker. Tests only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-N/: the run's folder, above each worker's own
    folder = root / f"shared_{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


def _official_r50_pth(folder: Path) -> None:
    keys = Path(__file__).resolve().parent / "fixtures" / "parity" / "official_keys_r50_4scale.txt"
    torch.save({"model": official_state_dict(keys), "optimizer": {}, "lr_scheduler": {}, "epoch": 11,
                "args": argparse.Namespace(lr=1e-4)}, folder / "checkpoint0011_4scale.pth")


@pytest.fixture(scope="session")
def official_r50_4scale_pth(tmp_path_factory) -> Path:
    """``checkpoint0011_4scale.pth`` as the official DINO repository saves it (``model``, ``optimizer``,
    ``lr_scheduler``, ``epoch``, ``args``), its R50 4-scale weights filled by the golden parity rule
    (tests/official_weights.py). 47M parameters filled and saved (about 190 MB) once per run; tests only read it."""
    return made_once(tmp_path_factory, "official_r50", _official_r50_pth) / "checkpoint0011_4scale.pth"


# A tiny model and its exports, paid once per run (tests/test_eval_artifacts.py; reusable by any test).
TINY_RECIPE = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
TINY_CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]


def _tiny_run(folder: Path) -> None:
    from dino.data import build_dataset
    from dino.engine.recipe import load_recipe
    from dino.engine.setup import weights_metadata
    from dino.models.dino import build_model
    from dino.weights import save_weights

    cfg = load_recipe(TINY_RECIPE, [f"data.root={folder / 'shapes'}"])
    build_dataset(cfg.data, "val")
    torch.manual_seed(0)
    save_weights(build_model(cfg.model).state_dict(), folder / "model.safetensors",
                 weights_metadata(cfg, TINY_CATEGORIES))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(model.safetensors, overrides)``: the tests' tiny recipe (engine_tiny_recipe.py) with random weights (seed 0),
    recording its recipe and categories as training does; ``overrides`` point data.root at its 64 px shapes images
    (5 validation images, generated here)."""
    folder = made_once(tmp_path_factory, "tiny_run", _tiny_run)
    return folder / "model.safetensors", [f"data.root={folder / 'shapes'}"]


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, tmp_path_factory):
    """``tiny_run``'s model exported to ONNX at 64x64, batch 1 (checked against PyTorch by the export tests)."""
    import dino_export

    def make(folder: Path) -> None:
        dino_export.export(tiny_run[0], "onnx", folder / "tiny.onnx", image_size=(64, 64), verify=False)

    return made_once(tmp_path_factory, "tiny_onnx", make) / "tiny.onnx"


@pytest.fixture(scope="session")
def tiny_openvino(tiny_run, tmp_path_factory):
    """``tiny_run``'s model exported to an f32 OpenVINO IR at 64x64 through `dino export openvino`."""
    from dino_cli import main

    def make(folder: Path) -> None:
        assert main(["export", "openvino", "--recipe", TINY_RECIPE, "--checkpoint", str(tiny_run[0]), "--image-size",
                     "64", "64", "--output", str(folder / "tiny.xml"), "--no-verify"]) == 0

    return made_once(tmp_path_factory, "tiny_openvino", make) / "tiny.xml"
