"""The official IDEA-Research/DINO code as a measured peer: its rows in the training and deployment tables.

The official code comes from a local checkout (``--official-root``, in scripts/gpu_check.sh ``$DINO_OFFICIAL_ROOT``),
imported as it is by scripts/official_code.py (see there for the stand-ins); its compiled op is never built. Its
deformable attention runs routed to (1) this project's re-creation of the original kernel design, csrc/bench/
(``dino.ops.bench.load_baseline()``, fp32, CUDA only; a CPU stand-in with the same call signature in dry runs) and
(2) the official pure-PyTorch ``ms_deform_attn_core_pytorch``. Rows, each saved as it finishes:

- deployment (appended to the deploy table): the official model + its ``PostProcess`` in eval, fp32, batch 1 (or the
  dry run's batch): FPS, latency, and the largest by-query |box| / |score| difference from OUR eager fp32 model
  holding the same weights (the official init converted with ``dino.convert.convert_official_state_dict``);
- training (appended to the train table): one step as the official ``main.py`` / ``engine.py`` build it (model,
  criterion and weight dict from ``build_dino``, AdamW over ``get_param_dict``, clipping 0.1), fp32, the bench's
  images and random targets: images/s and peak memory.

``--weights-out``: the converted official init as a safetensors file, written when the peer has exactly our bench's
shapes (not in dry runs: the official code needs hidden_dim 256 and a ResNet-50), for scripts/bench_*.py --weights.
Without a checkout, one row per table says the official rows were skipped and why.

    python scripts/official_peer.py --official-root DIR --train-json t.json --deploy-json d.json [--dry-run] ...
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import official_code
from bench_deploy import COLUMNS as DEPLOY_COLUMNS
from bench_deploy import Detector, by_query_diff
from bench_rows import (OFFICIAL_DEPLOY, RowWriter, deadline_passed, environment, median, model_config,
                        official_speedups, percentile, synchronize, time_calls)
from bench_train_step import COLUMNS as TRAIN_COLUMNS
from bench_train_step import random_targets

import dino
from dino.convert import convert_official_state_dict
from dino.ops.bench import load_baseline

DEPLOY_NAME = {route: name for route, name in zip(official_code.ROUTES, OFFICIAL_DEPLOY)}


class OfficialDetector(nn.Module):
    """The official model and ``PostProcess`` behind bench_deploy's ``Detector`` contract: ``(images, mask)`` ->
    boxes, scores, labels (top-K), query_boxes (B, Q, 4) xyxy pixels, query_scores (B, Q, C)."""

    def __init__(self, model: nn.Module, postprocess: nn.Module, nested_tensor):
        super().__init__()
        self.model, self.postprocess, self.nested_tensor = model.eval(), postprocess, nested_tensor

    def forward(self, images: Tensor, mask: Tensor):
        batch, _, height, width = images.shape
        out = self.model(self.nested_tensor(images, mask))
        sizes = torch.tensor([[height, width]], dtype=torch.float32, device=images.device).expand(batch, 2)
        results = self.postprocess(out, sizes)
        boxes = torch.stack([r["boxes"] for r in results])
        scores, labels = torch.stack([r["scores"] for r in results]), torch.stack([r["labels"] for r in results])
        cx, cy, w, h = out["pred_boxes"].unbind(-1)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=images.device)
        query_boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale
        return boxes, scores, labels, query_boxes, out["pred_logits"].sigmoid()


def peer_config(preset: str, dry_run: bool):
    """Our config the official model is sized like. Dry run: the bench's tiny config with the hidden size (256) and
    backbone (ResNet-50) the official code requires (its sine query embedding assumes 256)."""
    cfg = model_config(preset, tiny=dry_run)
    if dry_run:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, name="resnet50"),
                                  transformer=dataclasses.replace(cfg.transformer, hidden_dim=256))
    return cfg


def build_official(official, args: argparse.Namespace, device: torch.device):
    """(model, criterion, postprocessors) as ``main.py`` builds them, seeded so every build has the same init."""
    torch.manual_seed(0)
    model, criterion, postprocessors = official.build(args)
    return model.to(device), criterion.to(device), postprocessors


def deploy_row(official, args, device, route: str, images: Tensor, mask: Tensor, reference, warmup: int,
               iters: int) -> dict:
    """The official model + PostProcess timed in eval; ``reference``: our Detector's outputs on the same weights."""
    model, _, postprocessors = build_official(official, args, device)
    runner = OfficialDetector(model, postprocessors["bbox"], official.NestedTensor)
    row = {"backend": DEPLOY_NAME[route], "batch": images.shape[0]}
    with torch.no_grad():
        got = tuple(t.clone() for t in runner(images, mask))
        times = time_calls(lambda: runner(images, mask), device, warmup, iters)
    box_diff, score_diff = by_query_diff(reference, got)
    med = median(times)
    return {**row, "fps": images.shape[0] * 1000 / med, "median_ms": med, "p90_ms": percentile(times, 0.9),
            "setup_s": 0.0, "max_box_diff_px": box_diff, "max_score_diff": score_diff,
            "note": "diff: from our eager fp32 with the same (converted) weights"}


def train_row(official, args, device, route: str, batch: int, height: int, width: int, warmup: int,
              iters: int) -> dict:
    """One official training step (engine.train_one_epoch without the data loader), timed."""
    model, criterion, _ = build_official(official, args, device)
    model.train()
    criterion.train()
    optimizer = torch.optim.AdamW(official.get_param_dict(args, model), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen).to(device)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    targets = random_targets(batch, args.num_classes, device, gen)
    weight_dict, losses_seen = criterion.weight_dict, []

    def step():
        with official_code.cuda_calls_to(device):
            outputs = model(official.NestedTensor(images, mask), targets)
            loss_dict = criterion(outputs, targets)
        losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
        optimizer.zero_grad()
        losses.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()
        if not losses_seen:
            losses_seen.append(float(losses.detach()))

    row = {"code": f"official @ {official.commit}", "path": official_code.ROUTES[route], "precision": "fp32",
           "batch": batch, "image": f"{height}x{width}"}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        times = time_calls(step, device, warmup, iters)
    except torch.OutOfMemoryError as err:
        return {**row, "note": f"out of memory: {str(err).splitlines()[0][:120]}"}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    med = median(times)
    return {**row, "median_ms": med, "images_per_s": batch * 1000 / med, "peak_mem_gib": peak,
            "loss": losses_seen[0] if losses_seen else None,
            "note": f"{time.perf_counter() - start:.0f} s incl. warm-up; official init"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-root", default="", help="IDEA-Research/DINO checkout; empty: skip with a note")
    parser.add_argument("--preset", default="dino_r50_4scale")
    parser.add_argument("--routes", nargs="+", default=list(official_code.ROUTES), choices=list(official_code.ROUTES))
    parser.add_argument("--batch", type=int, default=2, help="training images per step (official: 2 per GPU)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    parser.add_argument("--train-json", type=Path)
    parser.add_argument("--train-table", type=Path)
    parser.add_argument("--deploy-json", type=Path)
    parser.add_argument("--deploy-table", type=Path)
    parser.add_argument("--weights-out", type=Path, help="converted official init, when shapes equal the bench's")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, 1 timed call")
    args = parser.parse_args(argv)

    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if args.dry_run:
        args.image_size, args.warmup, args.iters = (64, 96), 0, 1
    height, width = args.image_size
    deploy_batch = 2 if args.dry_run else 1  # the dry run's deploy batch (scripts/bench_deploy.py --dry-run)
    root = Path(args.official_root) if args.official_root else None
    meta = {"code": "official IDEA-Research/DINO (scripts/official_peer.py)",
            "preset": args.preset + (" (tiny, hidden 256, ResNet-50; dry run)" if args.dry_run else ""),
            "image": f"{height}x{width}", **environment(device)}
    train = RowWriter(args.train_json, args.train_table, TRAIN_COLUMNS, meta, append=True)
    deploy = RowWriter(args.deploy_json, args.deploy_table, DEPLOY_COLUMNS, meta, append=True,
                       derive=official_speedups)
    if root is None or not (root / "models" / "dino" / "dino.py").is_file():
        why = "DINO_OFFICIAL_ROOT is not set" if root is None else f"{root} is not an IDEA-Research/DINO checkout"
        note = f"official rows skipped: {why} (see docs/benchmarks.md, the official code as a peer)"
        train.add({"code": "official", "note": note})
        deploy.add({"backend": "official", "note": note})
        print(f"== official peer: {note}", flush=True)
        return 0

    official = official_code.load(root)
    cfg = peer_config(args.preset, args.dry_run)
    official_args = official_code.official_args(root, cfg, "resnet50", str(device))
    print(f"== official peer: {meta}, checkout {root} @ {official.commit}", flush=True)
    model, _, _ = build_official(official, official_args, device)
    converted = convert_official_state_dict(model.state_dict(), cfg, check_aliases=False)
    ours_model = dino.build_model(cfg)
    ours_model.load_state_dict(converted)
    if args.weights_out is not None and cfg == model_config(args.preset, tiny=args.dry_run):
        save_file({k: v.detach().cpu().contiguous() for k, v in converted.items()}, str(args.weights_out))
        print(f"converted official init -> {args.weights_out}", flush=True)
    del model, converted
    ours = Detector(ours_model, cfg.num_select).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(deploy_batch, 3, height, width, generator=gen).to(device)
    mask = torch.zeros(deploy_batch, height, width, dtype=torch.bool, device=device)
    with torch.no_grad():
        reference = tuple(t.clone() for t in ours(images, mask))
    del ours, ours_model

    baseline = None
    if "original" in args.routes:
        try:
            baseline = official_code.CpuBaseline() if device.type == "cpu" else load_baseline()
        except Exception as err:  # noqa: BLE001 - the PyTorch-path rows still run
            note = f"original kernel unavailable: {type(err).__name__}: {str(err).strip()[:160]}"
            train.add({"code": f"official @ {official.commit}", "path": official_code.ROUTES["original"],
                       "note": note})
            deploy.add({"backend": DEPLOY_NAME["original"], "note": note})
    dry_note = "; dry run: a CPU stand-in of the original kernel (PyTorch path)" if device.type == "cpu" else ""
    routes = [r for r in args.routes if r != "original" or baseline is not None]
    jobs = [("deploy", r) for r in routes] + [("train", r) for r in routes]
    for kind, route in jobs:
        if deadline_passed(deadline):
            note = f"skipped: budget of {args.budget_s:.0f} s spent"
            (deploy.add({"backend": DEPLOY_NAME[route], "note": note}) if kind == "deploy" else
             train.add({"code": "official", "path": official_code.ROUTES[route], "note": note}))
            continue
        official_code.route(route, baseline)
        extra = dry_note if route == "original" else ""
        if kind == "deploy":
            row = deploy_row(official, official_args, device, route, images, mask, reference, args.warmup,
                             args.iters)
            deploy.add({**row, "note": row["note"] + extra})
        else:
            row = train_row(official, official_args, device, route, args.batch, height, width, args.warmup,
                            args.iters)
            train.add({**row, "note": (row.get("note") or "") + extra})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
