"""Training-step speed and peak memory of a DINO preset at the official shapes (random weights, random targets).

One step = forward with denoising queries, criterion (Hungarian matching, all auxiliary losses), backward, gradient
clipping and an AdamW step, as ``dino.engine.train`` does. Each precision (fp32, bf16 autocast) is one row: images/s
from the median step time, and peak allocated CUDA memory. Which deformable-attention path runs is decided by the
process (``DINO_DISABLE_KERNEL=1`` for the PyTorch path), so the shell script runs this once per path.

    python scripts/bench_train_step.py --json train.json --table train.md [--dry-run]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench_rows import RowWriter, environment, median, model_config, synchronize, time_calls

import dino
import dino.ops
from dino.config import OptimConfig
from dino.criterion import build_criterion
from dino.engine.optim import build_optimizer

COLUMNS = [("code", "code"), ("path", "deformable attention"), ("precision", "precision"), ("batch", "images/step"),
           ("image", "image H x W"), ("median_ms", "median step ms"), ("images_per_s", "images/s"),
           ("peak_mem_gib", "peak memory GiB"), ("loss", "first loss"), ("note", "note")]


def random_targets(batch: int, num_classes: int, device: torch.device, gen: torch.Generator) -> list[dict]:
    """Between 5 and 20 boxes per image (COCO averages 7), cxcywh inside [0, 1], labels in [1, num_classes)."""
    targets = []
    for _ in range(batch):
        n = int(torch.randint(5, 21, (1,), generator=gen))
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        labels = torch.randint(1, num_classes, (n,), generator=gen)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], 1).to(device)})
    return targets


def _float32(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_float32(v) for v in outputs]
    return outputs


def make_step(model, criterion, optimizer, images, mask, targets, precision: str, clip: float):
    weight_dict = criterion.weight_dict
    losses_seen = []

    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(images, mask, targets)
        losses = criterion(_float32(outputs), targets)
        total = sum(losses[k] * w for k, w in weight_dict.items() if k in losses)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not losses_seen:
            losses_seen.append(float(total.detach()))

    return step, losses_seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dino_r50_4scale")
    parser.add_argument("--batch", type=int, default=2, help="images per step (official: 2 per GPU)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path)
    parser.add_argument("--append", action="store_true", help="keep the rows already in --json")
    parser.add_argument("--weights", type=Path, help="initial weights (safetensors; scripts/official_peer.py "
                        "--weights-out: the official init, for the same weights as the official rows)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and images on the CPU, 1 timed step")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if args.dry_run:
        args.image_size, args.warmup, args.iters = (64, 96), 0, 1
    height, width = args.image_size
    path = dino.ops.path_name(device)  # what runs: the CPU kernel on a CPU too, not "grid_sample"
    cfg = model_config(args.preset, tiny=args.dry_run)
    meta = {"preset": args.preset + (" (tiny, dry run)" if args.dry_run else ""), **environment(device),
            "timing": f"median of {args.iters} steps after {args.warmup} warm-up",
            "weights": f"{args.weights.name} (official init)" if args.weights else "random init (ours)"}
    writer = RowWriter(args.json, args.table, COLUMNS, meta, append=args.append)
    print(f"== training step: {meta}, deformable attention: {path}", flush=True)

    for precision in args.precisions:
        # bf16 autocast hands the seam bfloat16 values: the CPU kernel (float32/64) then leaves them to grid_sample.
        row_path = dino.ops.path_name(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        row = {"code": "ours", "path": row_path, "precision": precision, "batch": args.batch, "image": f"{height}x{width}"}
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            writer.add({**row, "note": "no bf16 on this GPU"})
            continue
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = dino.build_model(cfg)
        if args.weights is not None:
            model.load_state_dict(load_file(str(args.weights)))
        model = model.to(device).train()
        criterion = build_criterion(cfg).to(device)
        # Dry run: a frozen backbone keeps the CPU step to seconds (its backward dominates there); same code path.
        optim_cfg = OptimConfig(lr_backbone=0.0) if args.dry_run else OptimConfig()
        optimizer = build_optimizer(model, optim_cfg)
        images = torch.randn(args.batch, 3, height, width, generator=gen).to(device)
        mask = torch.zeros(args.batch, height, width, dtype=torch.bool, device=device)
        targets = random_targets(args.batch, cfg.num_classes, device, gen)
        step, losses = make_step(model, criterion, optimizer, images, mask, targets, precision, optim_cfg.clip_max_norm)
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            start = time.perf_counter()
            times = time_calls(step, device, args.warmup, args.iters)
        except torch.OutOfMemoryError as err:
            times, note = None, f"out of memory: {str(err).splitlines()[0][:120]}"
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        # Free this precision's model, optimizer state and gradients before the next row's peak is measured.
        del step, model, optimizer, criterion
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if times is None:
            writer.add({**row, "note": note})
            continue
        med = median(times)
        writer.add({**row, "median_ms": med, "images_per_s": args.batch * 1000 / med, "peak_mem_gib": peak,
                    "loss": losses[0] if losses else None,
                    "note": f"{time.perf_counter() - start:.0f} s incl. warm-up"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
