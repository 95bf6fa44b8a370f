"""Shared pytest setup: GPU and TensorRT tests skip cleanly where their hardware or library is missing."""
import importlib.util
import multiprocessing

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    no_trt = pytest.mark.skip(reason="needs the `tensorrt` Python package, which is not installed")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(no_trt)


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
