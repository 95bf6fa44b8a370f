"""Multi-scale deformable attention on the CPU: PyTorch path, custom op, dispatch seam, kernel build plumbing."""
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import importlib
from dino.ops import kernel, ms_deform_attn, ms_deform_attn_pytorch, path_name, use_custom_op, use_pytorch_path
from dino.ops.custom_op import ms_deform_attn_backward_pytorch

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "csrc" / "ms_deform_attn"


def make_inputs(shapes, B=2, M=2, D=3, Q=5, P=2, dtype=torch.float64, lo=-0.1, hi=1.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    loc = (lo + (hi - lo) * torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype))
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, level_start_index, loc, attn


def single_point(value_map, x, y):
    """One level, one head, one query, one point with weight 1: the output is the bilinear sample itself."""
    H, W = value_map.shape
    value = value_map.reshape(1, H * W, 1, 1).double()
    shapes = torch.tensor([[H, W]])
    start = torch.tensor([0])
    loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    attn = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    return ms_deform_attn_pytorch(value, shapes, start, loc, attn).item()


def test_output_shape_and_dtype():
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)], B=2, M=3, D=4, Q=7, P=2, dtype=torch.float32)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)
    assert out.shape == (2, 7, 3 * 4)
    assert out.dtype == torch.float32


def test_sampling_on_pixel_centres_returns_pixel_values():
    vmap = torch.arange(12, dtype=torch.float64).view(3, 4)
    for i in range(3):
        for j in range(4):
            got = single_point(vmap, (j + 0.5) / 4, (i + 0.5) / 3)
            assert got == pytest.approx(vmap[i, j].item(), abs=1e-12)


def test_sampling_between_centres_interpolates():
    vmap = torch.tensor([[1.0, 3.0], [5.0, 11.0]])
    assert single_point(vmap, 0.5, 0.25) == pytest.approx(2.0)  # halfway between (0,0) and (0,1)
    assert single_point(vmap, 0.5, 0.5) == pytest.approx(5.0)  # mean of the four


def test_borders_are_zero_padded():
    vmap = torch.tensor([[4.0, 8.0], [12.0, 16.0]])
    # x = 0 is half a pixel left of column 0's centre: half the weight falls on the zero padding.
    assert single_point(vmap, 0.0, 0.25) == pytest.approx(2.0)
    assert single_point(vmap, 0.0, 0.0) == pytest.approx(1.0)  # corner: a quarter of pixel (0,0)
    assert single_point(vmap, 1.0, 0.75) == pytest.approx(8.0)  # right edge: half of pixel (1,1)


def test_points_outside_the_map_give_zero():
    vmap = torch.ones(3, 3)
    for x, y in [(-0.5, 0.5), (1.5, 0.5), (0.5, -0.4), (0.5, 1.4), (2.0, 2.0)]:
        assert single_point(vmap, x, y) == 0.0


def test_left_edge_has_zero_value_but_a_location_gradient():
    # At x = -0.5 / W (w_im = -1) the sample is 0, yet column 0 is within reach: grid_sample, and so the CUDA kernel,
    # give d out / d x = W * v[0].
    value = torch.tensor([3.0, 5.0], dtype=torch.float64).view(1, 2, 1, 1)
    loc = torch.tensor([-0.25, 0.5], dtype=torch.float64).view(1, 1, 1, 1, 1, 2).requires_grad_()
    out = ms_deform_attn_pytorch(value, torch.tensor([[1, 2]]), torch.tensor([0]), loc, torch.ones(1, 1, 1, 1, 1,
                                 dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.sum(), loc)
    assert out.item() == 0.0
    assert grad.flatten().tolist() == pytest.approx([2 * 3.0, 0.0])


def test_levels_are_sampled_from_their_own_slice():
    # Level 0 is all ones, level 1 all twos: the output is sum of weights times each level's constant.
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2)], B=1, M=1, D=1, Q=4, P=3, lo=0.3, hi=0.7)
    value[:, :12] = 1.0
    value[:, 12:] = 2.0
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)
    expected = attn[..., 0, :].sum(-1) + 2 * attn[..., 1, :].sum(-1)
    torch.testing.assert_close(out.view(1, 4), expected.view(1, 4))


def test_pytorch_path_gradcheck_float64():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], B=1, M=2, D=2, Q=3, P=2)
    value.requires_grad_()
    loc.requires_grad_()
    attn.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_pytorch(v, shapes, starts, l, a), (value, loc, attn)
    )


def test_explicit_backward_matches_autograd_of_pytorch_path():
    value, shapes, starts, loc, attn = make_inputs([(5, 4), (3, 2), (1, 1)], B=2, M=2, D=3, Q=6, P=3)
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_pytorch(inputs[0], shapes, starts, inputs[1], inputs[2])
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, inputs, grad_out)
    got = ms_deform_attn_backward_pytorch(grad_out, value, shapes, starts, loc, attn)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_custom_op_on_cpu_equals_pytorch_path_and_gradchecks():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], B=2, M=2, D=2, Q=3, P=2)
    torch.testing.assert_close(  # the CPU kernel where it builds: other rounding
        torch.ops.dino.ms_deform_attn(value, shapes, starts, loc, attn),
        ms_deform_attn_pytorch(value, shapes, starts, loc, attn),
        rtol=1e-12,
        atol=1e-14,
    )
    args = [t.clone().requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, l, a: torch.ops.dino.ms_deform_attn(v, shapes, starts, l, a), args
    )


def test_opcheck():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], B=1, M=2, D=2, Q=3, P=2, dtype=torch.float32)
    value.requires_grad_()
    loc.requires_grad_()
    attn.requires_grad_()
    torch.library.opcheck(torch.ops.dino.ms_deform_attn.default, (value, shapes, starts, loc, attn))


def test_seam_uses_pytorch_path_on_cpu_without_the_kernel_and_logs_once(caplog, monkeypatch):
    # The package attribute ms_deform_attn is the function; the module itself comes from importlib.
    monkeypatch.setattr(importlib.import_module("dino.ops.ms_deform_attn"), "_logged_paths", set())
    monkeypatch.setattr(kernel.CPU_KERNEL, "module", None)  # as after a failed build
    monkeypatch.delenv("DINO_REQUIRE_KERNEL", raising=False)
    value, shapes, starts, loc, attn = make_inputs([(3, 4)], dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="dino.ops"):
        out = ms_deform_attn(value, shapes, starts, loc, attn)
        ms_deform_attn(value, shapes, starts, loc, attn)
    assert [r.getMessage() for r in caplog.records] == ["ms_deform_attn uses the PyTorch path (grid_sample)"]
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, starts, loc, attn), rtol=0, atol=0)


def test_path_name_names_the_path_that_runs(monkeypatch):
    # Benchmark rows are labelled with it: the CPU kernel when built, grid_sample for bf16 values or without it.
    built = kernel.load_cpu_kernel() is not None
    assert path_name("cpu") == ("CPU kernel" if built else "PyTorch (grid_sample)")
    assert path_name("cpu", torch.bfloat16) == "PyTorch (grid_sample)"
    monkeypatch.setattr(kernel.CPU_KERNEL, "module", None)  # as after a failed build
    monkeypatch.delenv("DINO_REQUIRE_KERNEL", raising=False)
    assert path_name("cpu") == "PyTorch (grid_sample)"


class _Block(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.register_buffer("shapes", torch.tensor(shapes))
        areas = self.shapes.prod(1)
        self.register_buffer("starts", torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]))

    def forward(self, value, loc, attn):
        return ms_deform_attn(value * 2, self.shapes, self.starts, loc.sigmoid(), attn.softmax(-1)) + 1


def test_use_custom_op_puts_one_op_node_in_exported_graph():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], dtype=torch.float32)
    block = _Block(shapes.tolist())
    with use_custom_op():
        exported = torch.export.export(block, (value, loc, attn))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dino.ms_deform_attn.default) == 1
    assert torch.ops.aten.grid_sampler_2d.default not in targets


def test_use_pytorch_path_inside_use_custom_op_traces_grid_sample():
    """The innermost block decides: an export that must not depend on the op (e.g. AOTInductor with custom_op=False
    on a GPU whose kernel is built, where the op is otherwise the default) gets the grid_sample decomposition."""
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], dtype=torch.float32)
    block = _Block(shapes.tolist())
    with use_custom_op(), use_pytorch_path():  # strict: the PyTorch path reads the level shapes with tolist
        exported = torch.export.export(block, (value, loc, attn), strict=True)
    with use_custom_op():
        eager_out = block(value, loc, attn)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.dino.ms_deform_attn.default not in targets
    assert sum("grid_sampler" in str(t) for t in targets) == 2  # one per level
    torch.testing.assert_close(exported.module()(value, loc, attn), eager_out)


def test_compile_fullgraph_with_custom_op_forward_and_backward():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], dtype=torch.float32)
    block = _Block(shapes.tolist())
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (value, loc, attn)]
    with use_custom_op():
        out = compiled(*args)
        out.square().sum().backward()
    ref_args = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = block(*ref_args)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for a, r in zip(args, ref_args):
        torch.testing.assert_close(a.grad, r.grad)


def test_load_kernel_without_cuda_falls_back_or_raises(monkeypatch):
    monkeypatch.setattr(kernel.CUDA_KERNEL, "module", kernel._UNSET)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DINO_REQUIRE_KERNEL", raising=False)
    assert kernel.load_kernel() is None
    assert kernel.kernel_state() is False
    monkeypatch.setenv("DINO_REQUIRE_KERNEL", "1")
    with pytest.raises(RuntimeError, match="DINO_REQUIRE_KERNEL.*is_available"):
        kernel.load_kernel()



def test_disable_kernel_skips_the_build_even_with_cuda(monkeypatch):
    monkeypatch.setattr(kernel.CUDA_KERNEL, "module", kernel._UNSET)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernel, "build_extension", lambda *a, **k: pytest.fail("must not build"))
    monkeypatch.setenv("DINO_DISABLE_KERNEL", "1")
    monkeypatch.delenv("DINO_REQUIRE_KERNEL", raising=False)
    assert kernel.load_kernel() is None
    monkeypatch.setenv("DINO_REQUIRE_KERNEL", "1")
    with pytest.raises(RuntimeError, match="DINO_DISABLE_KERNEL is set"):
        kernel.load_kernel()


def test_benchmark_baseline_stays_out_of_the_user_extension():
    names = {p.name for p in kernel.kernel_sources()}
    assert names == {"ms_deform_attn.cu", "ms_deform_attn_binding.cpp"}
    binding = (kernel.BINDING_DIR / "ms_deform_attn_binding.cpp").read_text()
    assert "baseline" not in binding

def test_cache_dir_changes_with_kernel_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_EXT_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "ms_deform_attn"
    shutil.copytree(KERNEL_DIR, copy)
    monkeypatch.setattr(kernel, "KERNEL_DIR", copy)
    before = kernel.cache_dir()
    assert before.parent == tmp_path / "cache"
    assert kernel.cache_dir() == before
    (copy / "ms_deform_attn.cu").write_text((copy / "ms_deform_attn.cu").read_text() + "\n// edit\n")
    assert kernel.cache_dir() != before


def test_kernel_sources_include_no_framework_headers():
    for path in KERNEL_DIR.iterdir():
        includes = [ln for ln in path.read_text().splitlines() if ln.strip().startswith("#include")]
        for line in includes:
            assert "torch" not in line and "ATen" not in line and "NvInfer" not in line, (path.name, line)


# sm_80 is compiled (warnings as errors) by the plugin tests (tests/test_plugin.py); one more architecture here.
@pytest.mark.parametrize("arch", ["sm_90"])
def test_kernels_compile_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    # Only the framework-free include directory is visible: proves the TensorRT plugin can build the same code.
    result = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-c", f"-arch={arch}", "-I", str(KERNEL_DIR),
         str(KERNEL_DIR / "ms_deform_attn.cu"), "-o", str(tmp_path / "msda.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]
    assert (tmp_path / "msda.o").stat().st_size > 0


def test_kernel_input_check_names_the_bad_argument():
    from dino.ops.custom_op import check_kernel_inputs

    value, shapes, starts, loc, attn = make_inputs([(4, 4), (2, 2)])
    check_kernel_inputs(value, shapes, starts, loc, attn)  # the contract's shapes pass
    with pytest.raises(ValueError, match=r"attention_weights must be \(2, 5, 2, 2, 2\), got \(2, 5, 2, 2, 1\)"):
        check_kernel_inputs(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(ValueError, match="sampling_locations must be"):
        check_kernel_inputs(value, shapes, starts, loc[:, :, :1], attn)
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        check_kernel_inputs(value, shapes[:1], starts, loc, attn)
    with pytest.raises(ValueError, match="same device"):
        check_kernel_inputs(value, shapes.to("meta"), starts, loc, attn)
