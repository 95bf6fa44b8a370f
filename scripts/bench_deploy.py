"""Deployed-inference speed of a DINO preset (random weights): eager fp32 / bf16, torch.compile, AOTInductor.

The deployed function is a local wrapper, ``(images, mask) -> boxes, scores, labels`` (the deploy-graph contract,
docs/deployment.md) built from the model and ``dino.postprocess.postprocess`` only, so this script does not depend on
export/ internals. Besides the top-K outputs, the wrapper returns every query's box and class scores, so the
difference from eager fp32 is taken query by query (a rank-order comparison after top-K would count near-tied scores
that swap places as large box errors).

Rows (each saved as it finishes): backend x batch, with FPS (images/s from the median latency), median and p90
latency, setup time (compile / export; the first call for torch.compile), and the largest |box| (pixels) and |score|
difference from eager fp32 on the same inputs. bf16 rows use autocast; AOTInductor is exported with the
deformable-attention seam as the ``dino::ms_deform_attn`` custom op (``dino.ops.use_custom_op()``), i.e. our kernel.

    python scripts/bench_deploy.py --json deploy.json --table deploy.md [--backends ...] [--dry-run]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from deploy_candidates import CANDIDATES, CudaGraphRunner, half_copy
from bench_rows import (SPEEDUP_COLUMNS, RowWriter, deadline_passed, environment, median, model_config,
                        official_speedups, percentile, time_calls)

import dino
import dino.ops
from dino.postprocess import postprocess

# Priority order (a cut run keeps the first): the reference, the batch-1 candidates, then the bf16 rows measured
# before (AOTInductor last among each: its package load segfaulted a GPU machine's process once).
BACKENDS = ("eager_fp32", *CANDIDATES, "eager_bf16", "compile_bf16_cudagraphs", "compile_bf16", "aoti_bf16")
COLUMNS = [("backend", "backend"), ("batch", "batch"), ("fps", "FPS (images/s)"), ("median_ms", "median ms"),
           ("p90_ms", "p90 ms"), ("setup_s", "setup s"), ("max_box_diff_px", "max box diff px"),
           ("max_score_diff", "max score diff"), *SPEEDUP_COLUMNS, ("note", "note")]


class Detector(nn.Module):
    """``forward(images (B,3,H,W) normalised, mask (B,H,W) True on padding)`` ->
    ``boxes (B,K,4)`` xyxy pixels, ``scores (B,K)``, ``labels (B,K)`` int64, plus ``query_boxes (B,Q,4)`` xyxy pixels
    and ``query_scores (B,Q,C)`` sigmoid probabilities of every query, for the by-query comparison.

    ``autocast``: run the detector under bf16 autocast (post-processing stays float32). ``half``: the model's weights
    are float16 (scripts/deploy_candidates.py), images are cast to it. ``channels_last``: images in that layout.
    """

    def __init__(self, model: nn.Module, num_select: int, autocast: bool = False, half: bool = False,
                 channels_last: bool = False):
        super().__init__()
        self.model, self.num_select, self.autocast = model.eval(), num_select, autocast
        self.half, self.channels_last = half, channels_last

    def forward(self, images: Tensor, mask: Tensor):
        batch, _, height, width = images.shape
        if self.half:
            images = images.half()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(images, mask)
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        # Sizes from Python numbers by device fills, not torch.tensor (a host-to-device copy, which a CUDA graph
        # capture refuses: scripts/deploy_candidates.py).
        sizes = torch.stack([logits.new_full((batch,), height), logits.new_full((batch,), width)], 1)
        scores, labels, boxes_xyxy = postprocess(logits, boxes, sizes, self.num_select)
        cx, cy, w, h = boxes.unbind(-1)
        query_boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                   (cy + h / 2) * height], -1)
        return boxes_xyxy, scores, labels, query_boxes, logits.sigmoid()


def by_query_diff(reference: tuple, got: tuple) -> tuple[float, float]:
    """Largest |box| (pixels) and |score| difference over every query and class."""
    return ((got[3].float() - reference[3].float()).abs().max().item(),
            (got[4].float() - reference[4].float()).abs().max().item())


def export_aoti(model: Detector, example: tuple[Tensor, Tensor], max_batch: int | None, workdir: Path,
                dry_run: bool):
    """AOTInductor package of ``model`` under the custom-op seam; the loaded runner takes ``(images, mask)``.

    ``max_batch``: a symbolic batch (1..max_batch); None: the example's static shapes. ``dry_run``: the exported
    program itself, without Inductor's C++ build (minutes on a small CPU)."""
    dynamic_shapes = None
    if max_batch is not None:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = {"images": {0: batch}, "mask": {0: batch}}
    with dino.ops.use_custom_op(), torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes=dynamic_shapes, strict=False)
    if dry_run:
        return program.module()
    name = "detector.pt2" if max_batch is not None else f"detector_b{example[0].shape[0]}.pt2"
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(workdir / name))
    return torch._inductor.aoti_load_package(path)


class StaticAotiRunner:
    """One static-shape AOTInductor package per batch size, compiled on the first call with that batch (the fallback
    when the symbolic-batch export is refused); that first call is counted as setup, as for torch.compile."""

    def __init__(self, model: Detector, workdir: Path, dry_run: bool):
        self.model, self.workdir, self.dry_run, self.packages = model, workdir, dry_run, {}

    def __call__(self, images: Tensor, mask: Tensor):
        b = images.shape[0]
        if b not in self.packages:
            self.packages[b] = export_aoti(self.model, (images, mask), None, self.workdir, self.dry_run)
        return self.packages[b](images, mask)


def make_runner(name: str, model: Detector, bf16_model: Detector, example, max_batch: int, workdir: Path,
                dry_run: bool):
    """(callable, setup seconds) of one backend; the callable takes (images, mask)."""
    start = time.perf_counter()
    if name == "eager_fp32":
        runner = model
    elif name == "eager_bf16":
        runner = bf16_model
    elif name == "aoti_bf16":
        try:
            runner = export_aoti(bf16_model, example, max_batch, workdir, dry_run)
        except Exception as err:  # noqa: BLE001 - e.g. the symbolic batch refused: static packages per batch instead
            print(f"aoti_bf16: symbolic-batch export failed ({type(err).__name__}: {_first_line(err)}); "
                  "compiling one static package per batch size", flush=True)
            runner = StaticAotiRunner(bf16_model, workdir, dry_run)
    elif name.startswith(("compile_bf16", "compile_fp16")):
        # One static graph per batch size (each first call compiles; counted in that row's setup time).
        target = bf16_model
        if name.startswith("compile_fp16"):
            channels_last = name.endswith("_cl")
            target = Detector(half_copy(model.model, channels_last), model.num_select, half=True,
                              channels_last=channels_last)
        if dry_run:  # Dynamo and AOTAutograd trace as on the GPU, without Inductor's code generation
            runner = torch.compile(target, backend="aot_eager", dynamic=False)
        else:
            mode = "reduce-overhead" if "cudagraphs" in name else "default"
            runner = torch.compile(target, mode=mode, dynamic=False)
    elif name == "cudagraph_fp16":
        runner = CudaGraphRunner(Detector(half_copy(model.model), model.num_select, half=True))
    elif name == "aoti_fp16_static":
        runner = StaticAotiRunner(Detector(half_copy(model.model), model.num_select, half=True), workdir, dry_run)
    else:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return runner, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dino_r50_4scale")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new backend after this many seconds (rows already saved stay)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path)
    parser.add_argument("--append", action="store_true", help="keep the rows already in --json (the official rows)")
    parser.add_argument("--weights", type=Path, help="model weights (safetensors; scripts/official_peer.py "
                        "--weights-out: the official init, the same weights as the official rows)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and images on the CPU, 1 timed call")
    args = parser.parse_args(argv)

    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if args.dry_run:
        args.image_size, args.batches, args.warmup, args.iters = (64, 96), [2], 0, 1
    height, width = args.image_size
    cfg = model_config(args.preset, tiny=args.dry_run)
    torch.manual_seed(0)
    net = dino.build_model(cfg)
    if args.weights is not None:
        net.load_state_dict(load_file(str(args.weights)))
    model = Detector(net, cfg.num_select).to(device).eval()
    bf16_model = Detector(model.model, cfg.num_select, autocast=True)
    meta = {"preset": args.preset + (" (tiny, dry run)" if args.dry_run else ""), "image": f"{height}x{width}",
            **environment(device), "eager deformable attention": dino.ops.path_name(device),
            "timing": f"median/p90 of {args.iters} calls after {args.warmup} warm-up",
            "weights": f"{args.weights.name} (official init)" if args.weights else "random init (ours)"}
    writer = RowWriter(args.json, args.table, COLUMNS, meta, append=args.append, derive=official_speedups)
    print(f"== deployed inference: {meta}", flush=True)

    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for b in args.batches:
        images = torch.randn(b, 3, height, width, generator=gen).to(device)
        mask = torch.zeros(b, height, width, dtype=torch.bool, device=device)
        inputs[b] = (images, mask)
    example = inputs[max(args.batches)] if max(args.batches) > 1 else \
        (inputs[args.batches[0]][0].expand(2, -1, -1, -1).contiguous(), inputs[args.batches[0]][1].expand(2, -1, -1))
    max_batch = max(max(args.batches), 2)

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        references = {b: tuple(t.clone() for t in model(*inputs[b])) for b in args.batches}
        fp16_references: dict[tuple[int, bool], tuple] = {}
        for name in args.backends:
            if deadline_passed(deadline):
                writer.add({"backend": name, "note": f"skipped: section budget of {args.budget_s:.0f} s spent"})
                continue
            try:
                runner, setup_s = make_runner(name, model, bf16_model, example, max_batch, Path(tmp), args.dry_run)
            except Exception as err:  # noqa: BLE001 - a backend that fails is a row saying why; the others still run
                writer.add({"backend": name, "note": f"setup failed: {type(err).__name__}: {_first_line(err)}"})
                continue
            # The candidates aim at batch 1 (the dry run's single batch size otherwise).
            batches = ([b for b in args.batches if b == 1] or args.batches[:1]) if name in CANDIDATES \
                else args.batches
            for b in batches:
                row = {"backend": name, "batch": b}
                lazy = name.startswith("compile") or isinstance(runner, (StaticAotiRunner, CudaGraphRunner))
                try:
                    first = time.perf_counter()
                    got = tuple(t.clone() for t in runner(*inputs[b]))  # compile: the first call compiles
                    if lazy:
                        setup_s += time.perf_counter() - first
                    times = time_calls(lambda: runner(*inputs[b]), device, args.warmup, args.iters)
                except Exception as err:  # noqa: BLE001
                    writer.add({**row, "note": f"failed: {type(err).__name__}: {_first_line(err)}"})
                    continue
                reference = references[b]
                if name in CANDIDATES:  # float16 against eager float16 on the same weights and layout
                    key = (b, name.endswith("_cl"))
                    if key not in fp16_references:
                        eager16 = Detector(half_copy(model.model, key[1]), model.num_select, half=True,
                                           channels_last=key[1])
                        fp16_references[key] = tuple(t.clone() for t in eager16(*inputs[b]))
                        del eager16
                    reference = fp16_references[key]
                box_diff, score_diff = by_query_diff(reference, got)
                med = median(times)
                writer.add({**row, "fps": b * 1000 / med, "median_ms": med, "p90_ms": percentile(times, 0.9),
                            "setup_s": setup_s, "max_box_diff_px": box_diff, "max_score_diff": score_diff,
                            "note": _note(name, args.dry_run)})
                if lazy:
                    setup_s = 0.0
            del runner
    return 0


def _note(name: str, dry_run: bool) -> str | None:
    if name in CANDIDATES:
        dry = {"cudagraph_fp16": "; dry run: no CUDA graph on the CPU (plain eager call)",
               "aoti_fp16_static": "; dry run: torch.export program, no AOTInductor build"}.get(name, "")
        if dry_run and name.startswith("compile"):
            dry = "; dry run: backend aot_eager"
        layout = ", channels-last" if name.endswith("_cl") else ""
        return f"fp16 candidate; diff: from eager fp16 (same weights{layout})" + (dry if dry_run else "")
    if dry_run and name == "aoti_bf16":
        return "dry run: torch.export program, no AOTInductor build"
    if dry_run and name.startswith("compile"):
        return "dry run: backend aot_eager"
    return "setup: the package for this batch (static) or for all batches (symbolic)" if name == "aoti_bf16" else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


if __name__ == "__main__":
    sys.exit(main())
