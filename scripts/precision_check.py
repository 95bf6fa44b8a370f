"""How far reduced-precision inference moves DINO's outputs from float32, query by query on the same selection.

DINO's decoder queries are the top-Q encoder tokens by proposal score (two-stage), and each query slot has its own
content embedding: when float16 ranks two near-tied proposals the other way, query i is a different object and a
query-by-query comparison measures that reordering, not precision (docs/benchmarks.md, the bf16 rows). Here every
reduced-precision run is compared twice with float32:

- its own selection: how many of the B x Q selected tokens differ from float32's, and the largest rank-wise
  difference of the selected proposals' probabilities (``dino_export.query_check.compare_selection``): how close
  the selection is to a valid float32 top-Q;
- forced onto float32's selection (``query_indices``): the largest difference of every query's class probabilities
  and box (pixels of the network input), the 99.9th percentile of the box difference, and the top-K detections
  matched by query (``compare_detections``), i.e. the precision error of the detector itself.

Precisions: ``fp16`` is the deploy model of ``dino export onnx --fp16`` (``DeployModel(half=True)``: the detector
cast to float16, post-processing float32); ``bf16`` is bf16 autocast. Model: ``dino_r50_4scale`` with random
weights (seed 0) whose zero-initialised box-head output layers are redrawn (``--head-std``), so boxes move away from
their anchors as trained boxes do. Input: a letterboxed batch (image 0 fills the canvas, image 1 about 3/4 of it).

    python scripts/precision_check.py --json precision.json --table precision.md [--image-size 800 1333] [--dry-run]

Needs ``dino`` and ``dino_export`` importable (``pip install -e .``, or the repository root and a folder holding a
``dino_export`` link to ``export/`` on PYTHONPATH, as scripts/gpu_check.sh does). ``DINO_DISABLE_KERNEL=1`` measures
the PyTorch (grid_sample) path on a GPU, where the CUDA kernel is used otherwise.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

from bench_rows import RowWriter, environment, median, model_config, time_calls

import dino
import dino.ops
from dino_export.deploy_model import DeployModel, DeployOutputs
from dino_export.query_check import (FP16_TOLERANCE, compare_detections, compare_queries, compare_selection,
                                    query_boxes_px)
from dino_export.tracing import example_inputs

COLUMNS = [("path", "deformable attention"), ("precision", "precision"), ("batch", "batch"),
           ("reselected", "queries reselected"),
           ("selection_score", "selection max dprob (rank-wise)"), ("query_score", "query max dprob"),
           ("query_box_px", "query max dbox px"), ("query_box_p999_px", "query dbox p99.9 px"),
           ("detection_score", "top-K max dscore"), ("detection_box_px", "top-K max dbox px"),
           ("median_ms", "eager median ms"), ("ms_fp32", "fp32 median ms")]


def build(preset: str, tiny: bool, head_std: float, device: torch.device) -> DeployModel:
    cfg = model_config(preset, tiny)
    torch.manual_seed(0)
    model = dino.build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    for head in (model.bbox_embed, model.transformer.enc_out_bbox_embed):
        last = head.layers[-1]
        with torch.no_grad():
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * head_std)
    return DeployModel(model.to(device), cfg.num_select)


class Autocast(torch.nn.Module):
    """``run`` of a float32 deploy model under bf16 autocast."""

    def __init__(self, deploy: DeployModel):
        super().__init__()
        self.deploy = deploy

    def run(self, images, mask, query_indices=None) -> DeployOutputs:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return self.deploy.run(images, mask, query_indices)


def box_p999(reference: DeployOutputs, got: DeployOutputs) -> float:
    ref = query_boxes_px(reference.pred_boxes, reference.valid_sizes)
    new = query_boxes_px(got.pred_boxes, got.valid_sizes)
    return float(np.quantile(np.abs(ref - new), 0.999))


def measure(name: str, candidate, fp32: DeployModel, reference: DeployOutputs, images, mask, device, warmup: int,
            iters: int) -> dict:
    """One row: ``candidate`` (anything with DeployModel's ``run``) against ``reference = fp32.run(images, mask)``."""
    with torch.no_grad():
        own = candidate.run(images, mask)
        forced = candidate.run(images, mask, query_indices=reference.query_indices)
        # The float32 model's scores of the candidate's picks, to check the candidate's selection rank-wise.
        on_own = fp32.run(images, mask, query_indices=own.query_indices)
    selection, reselected = compare_selection(reference, on_own)
    query_score, query_box = compare_queries(reference, forced.pred_logits, forced.pred_boxes)
    det_score, det_box = compare_detections(reference, forced.boxes, forced.scores, forced.labels, FP16_TOLERANCE)
    with torch.no_grad():
        times = time_calls(lambda: candidate.run(images, mask), device, warmup, iters)
    return {"precision": name, "batch": images.shape[0],
            "reselected": f"{reselected} of {own.query_indices.numel()}",
            "selection_score": selection.value, "query_score": query_score.value, "query_box_px": query_box.value,
            "query_box_p999_px": box_p999(reference, forced), "detection_score": det_score.value,
            "detection_box_px": det_box.value, "median_ms": median(times),
            "where": {"query_score": query_score.where, "query_box": query_box.where,
                      "selection": selection.where}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dino_r50_4scale")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--head-std", type=float, default=0.02,
                        help="std of the redrawn box-head output weights (0 keeps the zero init)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--append", action="store_true", help="keep the rows already in --json")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="tiny model and images on the CPU")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if args.dry_run:
        args.image_size, args.warmup, args.iters = (96, 128), 0, 1
    fp32 = build(args.preset, args.dry_run, args.head_std, device)
    height, width = args.image_size
    path = dino.ops.path_name(device)
    meta = {"preset": args.preset + (" (tiny, dry run)" if args.dry_run else ""), "image": f"{height}x{width}",
            **environment(device),
            "weights": f"random, seed 0, box-head output layers redrawn with std {args.head_std}",
            "timing": f"median of {args.iters} calls after {args.warmup} warm-up"}
    writer = RowWriter(args.json, args.table, COLUMNS, meta, append=args.append)
    print(f"== precision check: {meta}", flush=True)

    images, mask = example_inputs(args.batch, (height, width), device=device, seed=0)
    with torch.no_grad():
        reference = fp32.run(images, mask)
        ms_fp32 = median(time_calls(lambda: fp32.run(images, mask), device, args.warmup, args.iters))
    boxes = query_boxes_px(reference.pred_boxes, reference.valid_sizes)
    print(f"float32: boxes span {boxes.min():.1f}..{boxes.max():.1f} px, top score {reference.scores.max():.3f}, "
          f"{ms_fp32:.2f} ms", flush=True)
    for name in args.precisions:
        if name == "fp16":
            candidate = DeployModel(copy.deepcopy(fp32.model), fp32.num_select, half=True)
        else:
            candidate = Autocast(fp32)
        row = measure(name, candidate, fp32, reference, images, mask, device, args.warmup, args.iters)
        writer.add({"path": path, **row, "ms_fp32": ms_fp32})
        del candidate
    return 0


if __name__ == "__main__":
    sys.exit(main())
