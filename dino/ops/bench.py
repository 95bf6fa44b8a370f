"""Benchmark of multi-scale deformable attention: kernel vs PyTorch path (and, on CUDA, the original-style baseline).

``python -m dino.ops.bench`` times forward and forward+backward at DINO's 4-scale 800x1333 shapes (encoder: Q = S;
decoder: 900 queries + 200 denoising) after a warm-up (CUDA events; wall clock with ``--device cpu``, which times
the CPU kernel), and prints a markdown table of medians. The baseline (csrc/bench/) is benchmark-only code: it is
built here, into its own extension, never into the one every user compiles. ``--dry-run`` runs the table's code on
tiny shapes on the CPU (PyTorch path only).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dino.ops.kernel import CSRC, KERNEL_DIR, build_extension, load_cpu_kernel, load_kernel
from dino.ops.ms_deform_attn import ms_deform_attn_pytorch

BENCH_DIR = CSRC / "bench"

# Feature maps of an 800x1333 image at strides 8, 16, 32, 64.
LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
HEADS, CHANNELS, POINTS = 8, 32, 4
S = sum(h * w for h, w in LEVELS)
SHAPES = {"encoder": S, "decoder": 900 + 200}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_DTYPES = {"cuda": ["float32", "float16", "bfloat16"], "cpu": ["float32"]}
CPU_DTYPES = ("float32", "float64")  # the CPU kernel's


def make_inputs(batch: int, queries: int, dtype: torch.dtype, seed: int = 0, levels=LEVELS, device="cuda"):
    """Realistic inputs: reference points uniform over the image, small offsets, softmaxed weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    L, S = len(levels), sum(h * w for h, w in levels)
    spatial_shapes = torch.tensor(levels, dtype=torch.long, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(batch, S, HEADS, CHANNELS, generator=g, device=device)
    ref = torch.rand(batch, queries, 1, 1, 1, 2, generator=g, device=device)
    offsets = 0.02 * torch.randn(batch, queries, HEADS, L, POINTS, 2, generator=g, device=device)
    weights = torch.randn(batch, queries, HEADS, L * POINTS, generator=g, device=device).softmax(-1)
    return (value.to(dtype), spatial_shapes, level_start_index, (ref + offsets).to(dtype),
            weights.view(batch, queries, HEADS, L, POINTS).to(dtype))


def load_baseline():
    """The original-style baseline's extension (benchmarks only)."""
    return build_extension("dino_msda_baseline_ext",
                           [BENCH_DIR / "ms_deform_attn_baseline.cu", BENCH_DIR / "baseline_binding.cpp"],
                           (KERNEL_DIR, BENCH_DIR))


def time_ms(fn: Callable[[], object], warmup: int, reps: int, device: str = "cuda") -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, each timed with its own pair of CUDA events (wall clock on
    the CPU)."""
    if device == "cpu" or not torch.cuda.is_available():
        times = []
        for _ in range(warmup + reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times[warmup:])
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


def benchmark(batch: int, dtypes: list[str], warmup: int, reps: int, dry_run: bool = False,
              on_row: Callable[[list[dict]], None] | None = None, device: str = "cuda") -> list[dict]:
    """One row per (dtype, shape, pass); ``on_row(rows)`` after each, so a cut run keeps what finished."""
    if dry_run:  # tiny levels on the CPU: the PyTorch path only
        ext, base, levels, shapes, device = None, None, [(6, 9), (3, 5)], {"encoder": 69, "decoder": 11}, "cpu"
    elif device == "cpu":
        ext, base, levels, shapes = load_cpu_kernel(), None, LEVELS, SHAPES
        if ext is None:
            raise RuntimeError("the ms_deform_attn CPU kernel is unavailable (see the dino.ops warning)")
    else:
        ext = load_kernel()
        if ext is None:
            raise RuntimeError("the ms_deform_attn CUDA kernel is unavailable (see the dino.ops warning)")
        levels, shapes, device = LEVELS, SHAPES, "cuda"
        try:
            base = load_baseline()
        except Exception as err:  # noqa: BLE001 - the table is still useful without the baseline column
            print(f"original-style baseline unavailable ({type(err).__name__}: {err}); its column stays empty",
                  file=sys.stderr)
            base = None
    num_values = sum(h * w for h, w in levels)
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for shape_name, queries in shapes.items():
            inputs = make_inputs(batch, queries, dtype, levels=levels, device=device)
            grad_out = torch.randn(batch, queries, HEADS * CHANNELS, device=device, dtype=dtype)
            has_baseline = dtype == torch.float32 and base is not None
            candidates = {
                "forward": {
                    "pytorch": lambda: ms_deform_attn_pytorch(*inputs),
                    "kernel": (lambda: ext.forward(*inputs)) if ext is not None else None,
                    "baseline": (lambda: base.baseline_forward(*inputs)) if has_baseline else None,
                },
                "forward+backward": {
                    "pytorch": _pytorch_fwd_bwd(inputs, grad_out),
                    "kernel": (lambda: (ext.forward(*inputs), ext.backward(grad_out, *inputs)))
                    if ext is not None else None,
                    "baseline": (lambda: (base.baseline_forward(*inputs), base.baseline_backward(grad_out, *inputs)))
                    if has_baseline else None,
                },
            }
            for pass_name, fns in candidates.items():
                row = {"dtype": dtype_name, "shape": f"{shape_name} B={batch} Q={queries} S={num_values}",
                       "pass": pass_name}
                for impl, fn in fns.items():
                    row[impl] = time_ms(fn, warmup, reps, device) if fn is not None else None
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
            del inputs, grad_out
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the CPU kernel against the PyTorch path on this machine's CPU threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", help="comma-separated subset of " + ",".join(DTYPES) + " (default: "
                        + "; ".join(f"{d}: {','.join(v)}" for d, v in DEFAULT_DTYPES.items()) + ")")
    parser.add_argument("--warmup", type=int, help="default 5 (CUDA), 1 (CPU)")
    parser.add_argument("--reps", type=int, help="default 20 (CUDA), 5 (CPU)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file (after every row)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, PyTorch path only")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    dtypes = [d.strip() for d in (args.dtypes or ",".join(DEFAULT_DTYPES[args.device])).split(",") if d.strip()]
    allowed = CPU_DTYPES if cpu else tuple(DTYPES)
    unknown = [d for d in dtypes if d not in allowed]
    if unknown:
        parser.error(f"--dtypes: {unknown} not benchmarked on {args.device}; choose from {list(allowed)}")
    if not args.dry_run and not cpu and not torch.cuda.is_available():
        print("python -m dino.ops.bench needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--device cpu times the CPU kernel", file=sys.stderr)
        return 2
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    args.reps = args.reps if args.reps is not None else (5 if cpu else 20)
    if args.dry_run:
        args.warmup, args.reps = 0, 1
    if args.dry_run:
        device = "cpu (dry run)"
    elif cpu:
        device = f"{cpu_name()}, {torch.get_num_threads()} threads"
    else:
        device = torch.cuda.get_device_name()
    header = (f"torch {torch.__version__}, {'CPU' if cpu else f'CUDA {torch.version.cuda}'}; "
              f"medians of {args.reps} runs after {args.warmup} warm-up")

    def save(rows: list[dict]) -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(f".{args.out.name}.tmp")
            tmp.write_text(header + "\n\n" + markdown_table(rows, device) + "\n")
            tmp.replace(args.out)

    rows = benchmark(args.batch, dtypes, args.warmup, args.reps, args.dry_run, on_row=save, device=args.device)
    print(header)
    print()
    print(markdown_table(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
