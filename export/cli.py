"""``dino export onnx|trt|aoti`` and ``dino bench``."""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from dino.config import add_override_argument


def _add_model_args(p: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    p.add_argument("--recipe", required=True, help="recipe name or file (recipes/*.py), or a preset name")
    p.add_argument("--checkpoint", required=checkpoint_required, default=None,
                   help="model.safetensors (state dict of the recipe's model)" +
                        ("" if checkpoint_required else "; omitted: random weights"))
    add_override_argument(p)
    p.add_argument("--image-size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"),
                   help="input size in pixels (default 800 1333)")


def register(subparsers) -> None:
    exp = subparsers.add_parser("export", help="export a trained model (ONNX, TensorRT engine, AOTInductor)")
    targets = exp.add_subparsers(dest="target", required=True, metavar="TARGET")

    onnx_p = targets.add_parser("onnx", help="ONNX graph with post-processing inside (standard or TensorRT-plugin)")
    _add_model_args(onnx_p, checkpoint_required=True)
    onnx_p.add_argument("--deform-op", choices=("standard", "plugin"), default="standard",
                        help="standard: GridSample (any runtime); plugin: one DinoMSDeformAttn node per attention "
                             "(TensorRT with csrc/tensorrt)")
    onnx_p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis")
    onnx_p.add_argument("--max-batch", type=int, default=32, help="upper bound of the dynamic batch (default 32)")
    onnx_p.add_argument("--fp16", action="store_true", help="float16 detector (post-processing stays float32)")
    onnx_p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison")
    onnx_p.add_argument("--output", default="model.onnx")
    onnx_p.set_defaults(func=_cmd_export_onnx)

    trt_p = targets.add_parser("trt", help="TensorRT engine from an exported ONNX file (needs `tensorrt`)")
    trt_p.add_argument("--onnx", required=True)
    trt_p.add_argument("--fp16", action="store_true",
                       help="TensorRT 10 weakly typed FP16; on TensorRT 11 export the ONNX with --fp16 instead")
    trt_p.add_argument("--plugin-lib", action="append", default=[], metavar="PATH",
                       help="plugin library (libdino_trt_plugin.so) for a --deform-op plugin graph")
    trt_p.add_argument("--output", default=None, help="engine file (default: the ONNX path with .engine)")
    trt_p.add_argument("--workspace-gb", type=float, default=4.0)
    trt_p.add_argument("--max-batch", type=int, default=8, help="profile maximum for a dynamic-batch graph")
    trt_p.add_argument("--timing-cache", default=None, help="timing cache file (default: next to the engine)")
    trt_p.add_argument("--verbose", action="store_true")
    trt_p.set_defaults(func=_cmd_export_trt)

    aoti_p = targets.add_parser("aoti", help="AOTInductor package (.pt2), loadable with torch._inductor.aoti_load_package")
    _add_model_args(aoti_p, checkpoint_required=True)
    aoti_p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    aoti_p.add_argument("--dynamic-batch", action="store_true")
    aoti_p.add_argument("--max-batch", type=int, default=16)
    aoti_p.add_argument("--output", default="model.pt2")
    aoti_p.set_defaults(func=_cmd_export_aoti)

    from export.bench import ALL_BACKENDS

    bench = subparsers.add_parser("bench", help="latency of every available inference backend on the same inputs")
    _add_model_args(bench, checkpoint_required=False)
    bench.add_argument("--batch", nargs="+", type=int, default=[1])
    bench.add_argument("--backends", nargs="+", default=None, choices=ALL_BACKENDS, metavar="BACKEND",
                       help=f"subset of: {' '.join(ALL_BACKENDS)} (default: all)")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--iters", type=int, default=10)
    bench.add_argument("--plugin-lib", action="append", default=[], metavar="PATH")
    bench.add_argument("--json", default=None, help="also write the results as JSON")
    bench.add_argument("--table", default=None, help="also write the table as text")
    bench.set_defaults(func=_cmd_bench)


def _load(args, half: bool = False):
    from export.deploy_model import build_deploy_model, check_image_size

    size = check_image_size(args.image_size)
    model, desc = build_deploy_model(args.recipe, args.checkpoint, half=half, overrides=args.overrides)
    return model, desc, size


def _cmd_export_onnx(args) -> int:
    from export.onnx_export import export_onnx

    model, desc, size = _load(args, half=args.fp16)
    result = export_onnx(model, args.output, size, args.deform_op, args.dynamic_batch, args.max_batch,
                         verify=not args.no_verify)
    for check in result.checks:
        print(check.line())
    for note in result.notes:
        print(f"note: {note}")
    plugin = f", {result.num_plugin_nodes} DinoMSDeformAttn plugin nodes" if result.num_plugin_nodes else ""
    batch = "dynamic batch" if result.dynamic_batch else "batch 1"
    print(f"wrote {result.path} ({desc}; {args.deform_op}{plugin}; {size[0]}x{size[1]}, {batch}"
          f"{', float16' if args.fp16 else ''}); onnx.checker passed")
    return 0


def _cmd_export_trt(args) -> int:
    from export.trt_engine import build_engine, make_build_plan

    plan = make_build_plan(args.onnx, args.output, args.fp16, args.plugin_lib, args.workspace_gb, args.max_batch,
                           timing_cache=args.timing_cache)
    path, notes = build_engine(plan, verbose=args.verbose)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0


def _cmd_export_aoti(args) -> int:
    from export.aoti import export_aoti, load_aoti

    model, desc, size = _load(args)
    path = export_aoti(model, args.output, size, args.device, args.dynamic_batch, args.max_batch)
    runner = load_aoti(path)
    images = torch.randn(1, 3, *size, device=args.device)
    with torch.no_grad():
        ref = model.to(args.device)(images)
    got = runner(images)
    err = (got[0].float() - ref[0].float()).abs().max().item()
    print(f"AOTInductor package vs eager: max |boxes| error {err:.3g} px")
    print(f"wrote {path} ({desc}; {size[0]}x{size[1]} on {args.device})")
    return 0


def _cmd_bench(args) -> int:
    from export.bench import format_table, run_bench, write_json

    model, desc, size = _load(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hw = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'CPU'}, " \
                                                                       f"{torch.get_num_threads()} threads"
    header = (f"dino bench: {desc}; images {size[0]}x{size[1]}; device {device} ({hw}); torch {torch.__version__}; "
              f"{args.warmup} warm-up + {args.iters} timed calls")
    meta = {"model": desc, "image_size": list(size), "device": device, "hardware": hw, "torch": torch.__version__,
            "warmup": args.warmup, "iters": args.iters}

    def save(rows) -> None:
        # After every row, so a run cut short (timeout) still leaves its finished rows.
        if args.json:
            write_json(rows, meta, args.json)
        if args.table:
            Path(args.table).write_text(format_table(rows, header) + "\n")

    rows = run_bench(model, size, args.batch, args.backends, device, args.warmup, args.iters, args.plugin_lib,
                     on_row=save)
    print(format_table(rows, header))
    save(rows)
    if args.json:
        print(f"wrote {args.json}")
    return 0
