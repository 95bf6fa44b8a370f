"""The TensorRT plugin (csrc/tensorrt) built against TensorRT's public headers and driven as TensorRT drives it.

No TensorRT library is needed: the plugin library is linked with libnvinfer's symbols left for the loader, and a
driver of the test's own (csrc/tensorrt/driver) supplies the plugin registry and expression builder. The header sets
come from $DINO_TRT_HEADERS or ../shared/third_party/tensorrt-headers (present in CI); without them these tests skip
with that reason. Builds are shared by the whole test session (objects cached by source hash).
"""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dino.ops import ms_deform_attn_pytorch
from dino.ops.plugin_build import (
    HEADER_TAGS, SANITIZE, build_driver_checks, build_driver_enqueue, build_plugin, cuda_home, find_include,
    headers_root,
)
from tests.test_ms_deform_attn_cuda import TOLERANCE, make_inputs, rel_err

pytestmark = pytest.mark.plugin


def _missing_tools() -> str | None:
    if headers_root() is None:
        return ("no TensorRT headers: set DINO_TRT_HEADERS to a folder holding <tag>/include, or put "
                "shared/third_party/tensorrt-headers beside the repository")
    if shutil.which("g++") is None:
        return "no g++ on PATH"
    try:
        cuda_home()
    except FileNotFoundError as err:
        return str(err)
    return None


@pytest.fixture(scope="session")
def build_root(tmp_path_factory) -> Path:
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    env = os.environ.get("DINO_PLUGIN_BUILD_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("trt_plugin")


@pytest.fixture(scope="session")
def include_dir():
    def get(tag: str) -> Path:
        include = find_include(tag)
        if include is None:
            pytest.fail(f"TensorRT headers {tag} missing under {headers_root()} (expected {tag}/include/NvInferRuntime.h)")
        return include

    return get


@pytest.fixture(scope="session")
def asan_driver(build_root, include_dir):
    """tag -> the AddressSanitizer-built driver executable linked to that tag's plugin library (built once)."""
    built = {}

    def get(tag: str) -> Path:
        if tag not in built:
            include = include_dir(tag)
            lib = build_plugin(include, build_root / tag / "asan" / "libdino_trt_plugin.so", extra_flags=SANITIZE,
                               obj_dir=build_root)
            built[tag] = build_driver_checks(include, lib, build_root / tag / "plugin_checks")
        return built[tag]

    return get


@pytest.mark.parametrize("tag", HEADER_TAGS)
def test_plugin_library_links_with_tensorrt_symbols_left_for_the_loader(build_root, include_dir, tag):
    lib = build_plugin(include_dir(tag), build_root / tag / "libdino_trt_plugin.so", obj_dir=build_root)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) to list the library's symbols")
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout
    defined = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert " getPluginRegistry" in undefined, undefined
    assert "nvinfer" not in subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
    # Hidden visibility: the kernels' C API does not clash with the PyTorch extension loaded in the same process.
    assert "dino_msda_forward" not in defined


@pytest.mark.parametrize("tag", HEADER_TAGS)
def test_driver_checks_pass_under_address_sanitizer(asan_driver, tag):
    exe = asan_driver(tag)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"TensorRT headers {tag[1:]}" in proc.stdout
    assert "FAIL" not in proc.stdout and "AddressSanitizer" not in out and "LeakSanitizer" not in out, out
    expected = ["library load registers 2 creators", "creator field names (none)",
                "createPlugin refuses an unknown field", "getOutputShapes symbolic batch and queries",
                "supportsFormatCombination: exactly fp32/fp16/bf16 linear + int32 shape tables",
                "serialization round trip keeps identity and fields", "clone", "attachToContext",
                "onShapeChange rejects 17 levels"]
    for name in expected:
        assert f"ok {name}" in proc.stdout, f"check {name!r} did not run:\n{proc.stdout}"
    assert proc.stdout.rstrip().endswith("ALL OK")


def test_unknown_field_is_named_on_stderr(asan_driver):
    proc = subprocess.run([str(asan_driver(HEADER_TAGS[0]))], capture_output=True, text=True, timeout=120)
    assert 'msda_bad: unknown field "im2col_step"' in proc.stderr


# --- enqueue on a GPU -------------------------------------------------------------------------------------------

# (B, level shapes, M, D, Q, P): DINO-4scale at 800x1333 (encoder: Q = S; decoder: 900 + 200 denoising queries) and
# odd sizes.
LEVELS_800x1333 = [(100, 167), (50, 84), (25, 42), (13, 21)]
ENQUEUE_CASES = {
    "encoder_800x1333": (1, LEVELS_800x1333, 8, 32, sum(h * w for h, w in LEVELS_800x1333), 4),
    "decoder_800x1333_b2": (2, LEVELS_800x1333, 8, 32, 1100, 4),
    "odd_B3L3M3D5Q17P2": (3, [(11, 6), (6, 3), (3, 2)], 3, 5, 17, 2),
    "odd_B2L5M2D33Q9P3": (2, [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)], 2, 33, 9, 3),
}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="session")
def enqueue_lib(build_root, include_dir):
    major, minor = torch.cuda.get_device_capability()
    include = include_dir(HEADER_TAGS[0])
    lib = build_plugin(include, build_root / "gpu" / "libdino_trt_plugin.so", arch=f"{major}{minor}",
                       obj_dir=build_root)
    driver = ctypes.CDLL(str(build_driver_enqueue(include, lib, build_root / "gpu" / "libplugin_enqueue.so")))
    driver.dino_driver_enqueue.restype = ctypes.c_int
    return driver


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("case", list(ENQUEUE_CASES))
def test_enqueue_matches_pytorch_path(enqueue_lib, case, dtype):
    B, shapes, M, D, Q, P = ENQUEUE_CASES[case]
    value, spatial_shapes, starts, loc, attn = make_inputs(B, shapes, M, D, Q, P, dtype=dtype,
                                                           index_dtype=torch.int32)
    out = torch.full((B, Q, M, D), float("nan"), dtype=dtype, device="cuda")
    sizes = (ctypes.c_int64 * 7)(B, value.shape[1], M, D, len(shapes), Q, P)
    err = ctypes.create_string_buffer(512)
    stream = torch.cuda.current_stream().cuda_stream
    rc = enqueue_lib.dino_driver_enqueue(
        DTYPE_CODE[dtype], sizes, *(ctypes.c_void_p(t.data_ptr()) for t in (value, spatial_shapes, starts, loc, attn)),
        ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(stream), err, len(err))
    assert rc == 0, err.value.decode()
    ref = ms_deform_attn_pytorch(value.double(), spatial_shapes.long(), starts.long(), loc.double(), attn.double())
    got = out.view(B, Q, M * D)
    assert torch.isfinite(got).all(), "the plugin left output elements unwritten"
    assert rel_err(got, ref) <= TOLERANCE[dtype], f"relative error {rel_err(got, ref):.3g} > {TOLERANCE[dtype]}"
