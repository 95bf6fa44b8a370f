"""Benchmark of multi-scale deformable attention: CUDA kernel vs PyTorch path (and the original-style baseline).

``python -m dino.ops.bench`` times forward and forward+backward at DINO's 4-scale 800x1333 shapes (encoder: Q = S;
decoder: 900 queries + 200 denoising) with CUDA events after a warm-up, and prints a markdown table of medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from dino.ops.kernel import load_kernel
from dino.ops.ms_deform_attn import ms_deform_attn_pytorch

# Feature maps of an 800x1333 image at strides 8, 16, 32, 64.
LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
HEADS, CHANNELS, POINTS = 8, 32, 4
S = sum(h * w for h, w in LEVELS)
SHAPES = {"encoder": S, "decoder": 900 + 200}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_inputs(batch: int, queries: int, dtype: torch.dtype, seed: int = 0):
    """Realistic inputs: reference points uniform over the image, small offsets, softmaxed weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    L = len(LEVELS)
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.long, device="cuda")
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(batch, S, HEADS, CHANNELS, generator=g, device="cuda")
    ref = torch.rand(batch, queries, 1, 1, 1, 2, generator=g, device="cuda")
    offsets = 0.02 * torch.randn(batch, queries, HEADS, L, POINTS, 2, generator=g, device="cuda")
    weights = torch.randn(batch, queries, HEADS, L * POINTS, generator=g, device="cuda").softmax(-1)
    return (value.to(dtype), spatial_shapes, level_start_index, (ref + offsets).to(dtype),
            weights.view(batch, queries, HEADS, L, POINTS).to(dtype))


def time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, each timed with its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _pytorch_fwd_bwd(inputs, grad_out):
    value, shapes, starts, loc, attn = inputs
    args = [t.detach().requires_grad_() for t in (value, loc, attn)]

    def run():
        out = ms_deform_attn_pytorch(args[0], shapes, starts, args[1], args[2])
        torch.autograd.grad(out, args, grad_out)

    return run


def benchmark(batch: int, dtypes: list[str], warmup: int, reps: int) -> list[dict]:
    ext = load_kernel()
    if ext is None:
        raise RuntimeError("the ms_deform_attn CUDA kernel is unavailable (see the dino.ops warning)")
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for shape_name, queries in SHAPES.items():
            inputs = make_inputs(batch, queries, dtype)
            grad_out = torch.randn(batch, queries, HEADS * CHANNELS, device="cuda", dtype=dtype)
            has_baseline = dtype == torch.float32 and hasattr(ext, "baseline_forward")
            candidates = {
                "forward": {
                    "pytorch": lambda: ms_deform_attn_pytorch(*inputs),
                    "kernel": lambda: ext.forward(*inputs),
                    "baseline": (lambda: ext.baseline_forward(*inputs)) if has_baseline else None,
                },
                "forward+backward": {
                    "pytorch": _pytorch_fwd_bwd(inputs, grad_out),
                    "kernel": lambda: (ext.forward(*inputs), ext.backward(grad_out, *inputs)),
                    "baseline": (lambda: (ext.baseline_forward(*inputs), ext.baseline_backward(grad_out, *inputs)))
                    if has_baseline else None,
                },
            }
            for pass_name, fns in candidates.items():
                row = {"dtype": dtype_name, "shape": f"{shape_name} B={batch} Q={queries} S={S}", "pass": pass_name}
                for impl, fn in fns.items():
                    row[impl] = time_ms(fn, warmup, reps) if fn is not None else None
                rows.append(row)
            del inputs, grad_out
            torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict], device: str) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"x{a / b:.2f}"

    lines = [
        "| device | dtype | shape | pass | PyTorch path ms | original-style baseline ms | kernel ms "
        "| speed-up vs PyTorch | speed-up vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {device} | {r['dtype']} | {r['shape']} | {r['pass']} | {fmt(r['pytorch'])} | {fmt(r['baseline'])} "
            f"| {fmt(r['kernel'])} | {ratio(r['pytorch'], r['kernel'])} | {ratio(r['baseline'], r['kernel'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino.ops.bench", description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ",".join(DTYPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes: unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    if not torch.cuda.is_available():
        print("python -m dino.ops.bench needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    rows = benchmark(args.batch, dtypes, args.warmup, args.reps)
    table = markdown_table(rows, device)
    header = (f"torch {torch.__version__}, CUDA {torch.version.cuda}; "
              f"medians of {args.reps} runs after {args.warmup} warm-up")
    print(header)
    print()
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
