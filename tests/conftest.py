"""Shared pytest setup: GPU and TensorRT tests skip cleanly where their hardware or library is missing."""
import importlib.util

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
