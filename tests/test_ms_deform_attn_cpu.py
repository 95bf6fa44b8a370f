"""CPU kernel of multi-scale deformable attention against the PyTorch path (float64 and float32), gradcheck, the seam
and the fallback without a compiler. The kernel is built once per machine into the shared cache (dino.ops.kernel)."""
import importlib
import logging

import pytest
import torch

from dino.ops import kernel, ms_deform_attn, ms_deform_attn_pytorch, use_pytorch_path
from dino.ops.custom_op import ms_deform_attn_backward_pytorch

# (B, level shapes, M, D, Q, P): odd sizes, D = 32 (the compiled-in channel count) and others, L = 1..5.
CASES = [
    (1, [(7, 9)], 2, 8, 13, 3),
    (2, [(10, 13), (5, 7)], 3, 5, 17, 2),
    (3, [(11, 6), (6, 3), (3, 2)], 8, 32, 31, 4),
    (4, [(16, 20), (8, 10), (4, 5), (2, 3)], 4, 33, 9, 4),
    (2, [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)], 2, 7, 7, 1),
    (1, [(25, 42), (13, 21), (7, 11), (4, 6)], 8, 32, 300, 4),
]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def ext():
    module = kernel.load_cpu_kernel()
    assert module is not None, "the CPU kernel failed to build (see the dino.ops warning)"
    return module


def make_inputs(B, shapes, M, D, Q, P, dtype, index_dtype=torch.int64, seed=0, quantize=True):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=index_dtype)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]).to(index_dtype)
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    # 20% margin on each side: many points fall partly or wholly outside their map.
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    # Multiples of 2^-16: x * W - 0.5 is exact in float32 as in float64, so no point crosses a pixel boundary (where
    # the location gradient jumps) through coordinate rounding alone.
    if quantize:
        loc = (loc * 65536).round() / 65536
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64).softmax(-1)
    return value, spatial_shapes, level_start_index, loc.to(dtype), attn.to(dtype)


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def pytorch_path(value, shapes, starts, loc, attn, grad_out):
    """The PyTorch path in the inputs' own dtype: output and the three gradients (autograd of grid_sample)."""
    args = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_pytorch(args[0], shapes.long(), starts.long(), args[1], args[2])
    return out.detach(), torch.autograd.grad(out, args, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{len(c[1])}M{c[2]}D{c[3]}Q{c[4]}P{c[5]}")
def test_kernel_matches_pytorch_path(ext, case, dtype):
    value, shapes, starts, loc, attn = make_inputs(*case, dtype=dtype)
    out = ext.forward(value, shapes, starts, loc, attn)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = ext.backward(grad_out, value, shapes, starts, loc, attn)
    ref_out, ref_grads = pytorch_path(value, shapes, starts, loc, attn, grad_out)
    tol = TOLERANCE[dtype]
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, g, r in zip(names, (out, *got), (ref_out, *ref_grads)):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert rel_err(g, r) <= tol, f"{name}: relative error {rel_err(g, r):.3g} > {tol}"


def test_points_exactly_on_pixel_boundaries_and_map_edges(ext):
    # h_im = y * H - 0.5 runs over every integer from -1 (the edge where only row 0 is still in reach) to H.
    H, W, M, D = 4, 8, 2, 8
    ys = (torch.arange(-1, H + 1, dtype=torch.float64) + 0.5) / H
    xs = (torch.arange(-1, W + 1, dtype=torch.float64) + 0.5) / W
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # (Q, 2) as (x, y)
    Q = grid.shape[0]
    shapes, starts = torch.tensor([[H, W]]), torch.tensor([0])
    value = torch.randn(1, H * W, M, D, dtype=torch.float64)
    loc = grid.view(1, Q, 1, 1, 1, 2).expand(1, Q, M, 1, 1, 2).contiguous()
    attn = torch.ones(1, Q, M, 1, 1, dtype=torch.float64)
    out = ext.forward(value, shapes, starts, loc, attn)
    grad_out = torch.randn_like(out)
    got = ext.backward(grad_out, value, shapes, starts, loc, attn)
    ref_out, ref_grads = pytorch_path(value, shapes, starts, loc, attn, grad_out)
    assert rel_err(out, ref_out) <= 1e-12
    for name, g, r in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), got, ref_grads):
        assert rel_err(g, r) <= 1e-12, name


def test_points_far_outside_give_zero_output_and_gradients(ext):
    value, shapes, starts, loc, attn = make_inputs(2, [(5, 6), (3, 3)], 2, 8, 4, 2, dtype=torch.float32)
    loc = torch.full_like(loc, 3.0)
    out = ext.forward(value, shapes, starts, loc, attn)
    assert torch.count_nonzero(out) == 0
    grads = ext.backward(torch.ones_like(out), value, shapes, starts, loc, attn)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_int32_shape_tables_give_the_same_result(ext):
    a = make_inputs(*CASES[3], dtype=torch.float32)
    b = make_inputs(*CASES[3], dtype=torch.float32, index_dtype=torch.int32)
    torch.testing.assert_close(ext.forward(*a), ext.forward(*b), rtol=0, atol=0)
    go = torch.randn(CASES[3][0], CASES[3][4], CASES[3][2] * CASES[3][3])
    for x, y in zip(ext.backward(go, *a), ext.backward(go, *b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # no atomics: the same order of sums


def test_grad_value_is_the_same_with_one_thread_and_query_chunks(ext):
    # More threads than (b, m) pairs split the queries into chunks with their own grad_value buffers.
    value, shapes, starts, loc, attn = make_inputs(1, [(12, 10), (6, 5)], 1, 32, 400, 4, dtype=torch.float64)
    go = torch.randn(1, 400, 32, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ext.backward(go, value, shapes, starts, loc, attn)
        torch.set_num_threads(4)
        chunked = ext.backward(go, value, shapes, starts, loc, attn)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(single, chunked):
        assert rel_err(x, y) <= 1e-14


def test_level_outside_value_is_an_error_not_a_read_out_of_bounds(ext):
    value, shapes, starts, loc, attn = make_inputs(1, [(4, 4), (2, 2)], 2, 8, 3, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="level 1 .* does not fit in value's 20 positions"):
        ext.forward(value, shapes, starts + 1, loc, attn)


def test_custom_op_gradcheck_float64_on_cpu_kernel(ext):
    # Not quantized: finite differences across an exact pixel boundary would see the gradient's jump.
    value, shapes, starts, loc, attn = make_inputs(1, [(4, 5), (2, 3)], 2, 4, 3, 2, dtype=torch.float64,
                                                   quantize=False)
    args = [t.clone().requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, l, a: torch.ops.dino.ms_deform_attn(v, shapes, starts, l, a), args)


def test_seam_uses_the_cpu_kernel_for_float_tensors_and_the_pytorch_path_for_bfloat16(ext, caplog, monkeypatch):
    monkeypatch.setattr(importlib.import_module("dino.ops.ms_deform_attn"), "_logged_paths", set())
    value, shapes, starts, loc, attn = make_inputs(*CASES[2], dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="dino.ops"):
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert "ms_deform_attn uses the custom op dino::ms_deform_attn (CPU kernel)" in caplog.text
    torch.testing.assert_close(out, ext.forward(value, shapes, starts, loc, attn), rtol=0, atol=0)
    with use_pytorch_path():
        assert rel_err(ms_deform_attn(value, shapes, starts, loc, attn), out) <= 1e-5
    half = [t.bfloat16() if t.is_floating_point() else t for t in (value, shapes, starts, loc, attn)]
    torch.testing.assert_close(ms_deform_attn(*half), ms_deform_attn_pytorch(*half), rtol=0, atol=0)


def test_seam_gradients_through_the_kernel_equal_the_pytorch_path(ext):
    value, shapes, starts, loc, attn = make_inputs(*CASES[1], dtype=torch.float64)
    grad_out = torch.randn(CASES[1][0], CASES[1][4], CASES[1][2] * CASES[1][3], dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (value, loc, attn)]
    got = torch.autograd.grad(ms_deform_attn(args[0], shapes, starts, args[1], args[2]), args, grad_out)
    expected = ms_deform_attn_backward_pytorch(grad_out, value, shapes, starts, loc, attn)
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-12


def test_disable_kernel_gives_the_pytorch_path_on_cpu(monkeypatch):
    monkeypatch.setattr(kernel.CPU_KERNEL, "module", kernel._UNSET)
    monkeypatch.setattr(kernel, "build_extension", lambda *a, **k: pytest.fail("must not build"))
    monkeypatch.setenv("DINO_DISABLE_KERNEL", "1")
    monkeypatch.delenv("DINO_REQUIRE_KERNEL", raising=False)
    value, shapes, starts, loc, attn = make_inputs(*CASES[1], dtype=torch.float64)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, attn),
                               ms_deform_attn_pytorch(value, shapes, starts, loc, attn), rtol=0, atol=0)
    assert kernel.cpu_kernel_state() is False


def test_no_compiler_falls_back_with_one_warning_or_raises(monkeypatch, caplog):
    monkeypatch.setattr(kernel.CPU_KERNEL, "module", kernel._UNSET)
    monkeypatch.setenv("CXX", "no-such-compiler-dino")
    monkeypatch.delenv("DINO_DISABLE_KERNEL", raising=False)
    monkeypatch.delenv("DINO_REQUIRE_KERNEL", raising=False)
    value, shapes, starts, loc, attn = make_inputs(*CASES[0], dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="dino.ops"):
        out = torch.ops.dino.ms_deform_attn(value, shapes, starts, loc, attn)
        torch.ops.dino.ms_deform_attn(value, shapes, starts, loc, attn)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["ms_deform_attn CPU kernel unavailable (no C++ compiler found (no-such-compiler-dino; set "
                        "CXX)); using the PyTorch path"]
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, starts, loc, attn), rtol=0, atol=0)
    monkeypatch.setattr(kernel.CPU_KERNEL, "module", kernel._UNSET)
    monkeypatch.setenv("DINO_REQUIRE_KERNEL", "1")
    with pytest.raises(RuntimeError, match="DINO_REQUIRE_KERNEL is set but the ms_deform_attn CPU kernel"):
        kernel.load_cpu_kernel()


def test_failed_build_falls_back_with_one_line(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'dino_msda_cpu_ext'\nc++ output line 1\nline 2")

    monkeypatch.setattr(kernel.CPU_KERNEL, "module", kernel._UNSET)
    monkeypatch.setattr(kernel, "build_extension", broken)
    monkeypatch.delenv("DINO_DISABLE_KERNEL", raising=False)
    monkeypatch.delenv("DINO_REQUIRE_KERNEL", raising=False)
    with caplog.at_level(logging.WARNING, logger="dino.ops"):
        assert kernel.load_cpu_kernel() is None
    assert [r.getMessage() for r in caplog.records] == [
        "ms_deform_attn CPU kernel unavailable (build failed: Error building extension 'dino_msda_cpu_ext'); "
        "using the PyTorch path"]


def test_the_cpu_extension_is_its_own_small_build():
    # The binding alone is compiled; the framework-free kernels come in as a header shared with the OpenVINO op.
    assert [p.name for p in kernel.cpu_kernel_sources()] == ["ms_deform_attn_cpu_binding.cpp"]
    assert kernel.CPU_KERNEL.source_dirs == (kernel.CPU_DIR, kernel.BINDING_DIR)
    assert (kernel.CPU_DIR / "ms_deform_attn_cpu.h").is_file()
    assert kernel.cache_dir(kernel.CPU_KERNEL.source_dirs) != kernel.cache_dir()
