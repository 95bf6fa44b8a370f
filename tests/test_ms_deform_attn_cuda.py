"""CUDA kernel of multi-scale deformable attention against the float64 PyTorch path (skipped without a GPU)."""
import pytest
import torch

from dino.ops import ms_deform_attn, ms_deform_attn_pytorch, use_custom_op
from dino.ops.kernel import load_kernel

pytestmark = pytest.mark.cuda

# (B, level shapes, M, D, Q, P): odd sizes, D that is not a multiple of the vector width, D beyond one pass of a
# 32-lane group (multi-chunk path), L = 1..5.
CASES = [
    (1, [(7, 9)], 2, 8, 13, 3),
    (2, [(10, 13), (5, 7)], 3, 5, 17, 2),
    (3, [(11, 6), (6, 3), (3, 2)], 8, 32, 31, 4),
    (4, [(16, 20), (8, 10), (4, 5), (2, 3)], 4, 33, 9, 4),
    (2, [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)], 2, 160, 7, 1),
    (1, [(25, 42), (13, 21), (7, 11), (4, 6)], 8, 32, 300, 4),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def ext():
    module = load_kernel()
    assert module is not None, "the CUDA kernel failed to build (see the dino.ops warning)"
    return module


def make_inputs(B, shapes, M, D, Q, P, dtype, index_dtype=torch.int64, seed=0, quantize=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=index_dtype, device="cuda")
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]).to(index_dtype)  # prod() gives int64
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, device="cuda").to(dtype)
    # 20% margin on each side: many points fall partly or wholly outside their map.
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, device="cuda") * 1.4 - 0.2
    # Multiples of 2^-16: x * W - 0.5 is then exact in float32 as in float64, so no point lands on the other side of
    # a pixel boundary (where the location gradient jumps) through coordinate rounding alone. Such dyadic values also
    # hit pixel boundaries and the map's edge exactly now and then, where kernel and grid_sample must agree too.
    if quantize:
        loc = (loc * 65536).round() / 65536
    loc = loc.to(dtype)
    attn = torch.rand(B, Q, M, L, P, generator=g, device="cuda").softmax(-1).to(dtype)
    return value, spatial_shapes, level_start_index, loc, attn


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def reference(value, shapes, starts, loc, attn, grad_out):
    """float64 PyTorch path on the same (already rounded) inputs: output and the three gradients."""
    args = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_pytorch(args[0], shapes.long(), starts.long(), args[1], args[2])
    grads = torch.autograd.grad(out, args, grad_out.double())
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{len(c[1])}M{c[2]}D{c[3]}Q{c[4]}P{c[5]}")
def test_kernel_matches_float64_reference(ext, case, dtype):
    value, shapes, starts, loc, attn = make_inputs(*case, dtype=dtype)
    out = ext.forward(value, shapes, starts, loc, attn)
    grad_out = torch.randn_like(out)
    grad_value, grad_loc, grad_attn = ext.backward(grad_out, value, shapes, starts, loc, attn)
    ref_out, (ref_gv, ref_gl, ref_ga) = reference(value, shapes, starts, loc, attn, grad_out)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and grad_value.dtype == dtype and grad_loc.dtype == dtype
    pairs = [("output", out, ref_out), ("grad_value", grad_value, ref_gv),
             ("grad_sampling_locations", grad_loc, ref_gl), ("grad_attention_weights", grad_attn, ref_ga)]
    for name, got, ref in pairs:
        assert got.shape == ref.shape, name
        assert rel_err(got, ref) <= tol, f"{name}: relative error {rel_err(got, ref):.3g} > {tol}"


def test_points_exactly_on_pixel_boundaries_and_map_edges(ext):
    # h_im = y * H - 0.5 runs over every integer from -1 (the edge where only row 0 is still in reach) to H.
    H, W, M, D = 4, 8, 2, 8
    ys = (torch.arange(-1, H + 1, dtype=torch.float64) + 0.5) / H
    xs = (torch.arange(-1, W + 1, dtype=torch.float64) + 0.5) / W
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2).cuda()  # (Q, 2) as (x, y)
    Q = grid.shape[0]
    shapes = torch.tensor([[H, W]], device="cuda")
    starts = torch.tensor([0], device="cuda")
    value = torch.randn(1, H * W, M, D, dtype=torch.float64, device="cuda")
    loc = grid.view(1, Q, 1, 1, 1, 2).expand(1, Q, M, 1, 1, 2).contiguous()
    attn = torch.ones(1, Q, M, 1, 1, dtype=torch.float64, device="cuda")
    out = ext.forward(value, shapes, starts, loc, attn)
    grad_out = torch.randn_like(out)
    got = ext.backward(grad_out, value, shapes, starts, loc, attn)
    ref_out, ref_grads = reference(value, shapes, starts, loc, attn, grad_out)
    assert rel_err(out, ref_out) <= 1e-12
    for name, g, r in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), got, ref_grads):
        assert rel_err(g, r) <= 1e-12, name


def test_int32_shape_tables_give_the_same_result(ext):
    case = CASES[3]
    a = make_inputs(*case, dtype=torch.float32)
    b = make_inputs(*case, dtype=torch.float32, index_dtype=torch.int32)
    torch.testing.assert_close(ext.forward(*a), ext.forward(*b), rtol=0, atol=0)
    go = torch.randn(case[0], case[4], case[2] * case[3], device="cuda")
    for x, y in zip(ext.backward(go, *a), ext.backward(go, *b)):
        assert rel_err(x, y.double()) <= 1e-6  # atomics: the summation order may differ


def test_points_far_outside_give_zero_output_and_gradients(ext):
    value, shapes, starts, loc, attn = make_inputs(2, [(5, 6), (3, 3)], 2, 8, 4, 2, dtype=torch.float32)
    loc = torch.full_like(loc, 3.0)
    out = ext.forward(value, shapes, starts, loc, attn)
    assert torch.count_nonzero(out) == 0
    grads = ext.backward(torch.ones_like(out), value, shapes, starts, loc, attn)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_bad_input_raises_clear_error(ext):
    # Through the op: Python checks the inputs before the kernel (the C++ checks' exception path crashed one
    # torch/driver combination, see docs/benchmarks.md).
    value, shapes, starts, loc, attn = make_inputs(1, [(4, 4)], 2, 8, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="attention_weights must be"):
        torch.ops.dino.ms_deform_attn(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(ValueError, match="same device"):
        torch.ops.dino.ms_deform_attn(value, shapes.cpu(), starts, loc, attn)


def test_custom_op_gradcheck_float64_on_cuda():
    # Not quantized: finite differences across an exact pixel boundary would see the gradient's jump.
    value, shapes, starts, loc, attn = make_inputs(1, [(4, 5), (2, 3)], 2, 4, 3, 2, dtype=torch.float64, quantize=False)
    args = [t.clone().requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, l, a: torch.ops.dino.ms_deform_attn(v, shapes, starts, l, a), args, fast_mode=True
    )


def test_seam_uses_kernel_for_cuda_tensors(ext):
    value, shapes, starts, loc, attn = make_inputs(*CASES[2], dtype=torch.float32)
    expected = ext.forward(value, shapes, starts, loc, attn)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, attn), expected, rtol=0, atol=0)


class _Block(torch.nn.Module):
    def __init__(self, shapes, M, D, L, P):
        super().__init__()
        self.register_buffer("shapes", torch.tensor(shapes))
        areas = self.shapes.prod(1)
        self.register_buffer("starts", torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]))
        self.M, self.L, self.P = M, L, P
        self.offsets = torch.nn.Linear(M * D, M * L * P * 2)
        self.weights = torch.nn.Linear(M * D, M * L * P)
        self.proj = torch.nn.Linear(M * D, M * D)

    def forward(self, query, value, ref):
        B, Q, _ = query.shape
        off = self.offsets(query).view(B, Q, self.M, self.L, self.P, 2)
        loc = ref[:, :, None, None, None, :] + 0.1 * off.tanh()
        w = self.weights(query).view(B, Q, self.M, self.L * self.P).softmax(-1).view(B, Q, self.M, self.L, self.P)
        return self.proj(ms_deform_attn(value, self.shapes, self.starts, loc, w))


def test_compile_fullgraph_block_runs_forward_and_backward(ext):
    torch.manual_seed(0)
    shapes, M, D, P = [(12, 16), (6, 8)], 4, 8, 2
    block = _Block(shapes, M, D, len(shapes), P).cuda()
    S = sum(h * w for h, w in shapes)
    query = torch.randn(2, 50, M * D, device="cuda", requires_grad=True)
    value = torch.randn(2, S, M, D, device="cuda", requires_grad=True)
    ref = torch.rand(2, 50, 2, device="cuda")
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(query, value, ref)
    out.square().mean().backward()
    eager = block(query, value, ref)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert query.grad is not None and value.grad is not None and torch.isfinite(value.grad).all()


def test_use_custom_op_on_cuda_matches(ext):
    value, shapes, starts, loc, attn = make_inputs(*CASES[1], dtype=torch.float32)
    with use_custom_op():
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    ref, _ = reference(value, shapes, starts, loc, attn, torch.zeros_like(out))
    assert rel_err(out, ref) <= 1e-5
