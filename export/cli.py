"""``dino export onnx|trt|aoti`` and ``dino bench``."""
from __future__ import annotations

import argparse
import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from dino.config import add_override_argument
from dino.device import check_device
from dino.durable import check_output_file
from dino.engine.recipe import RECIPE_RUNS_AS_PYTHON
from dino.errors import CheckFailure, UserError
from dino.models.memory import check_forward_fits
from dino.model_loading import checkpoint_file
from dino_export.check_reference import REFERENCES
from dino_export.query_check import ExportCheckError, GraphDisagrees


def _add_model_args(p: argparse.ArgumentParser, checkpoint_required: bool, recipe_required: bool = True) -> None:
    p.add_argument("--recipe", required=recipe_required, help="recipe name or file (recipes/*.py), or a preset name; "
                   f"{RECIPE_RUNS_AS_PYTHON}")
    p.add_argument("--checkpoint", required=checkpoint_required, default=None,
                   help="model.safetensors or official .pth of the recipe's model" +
                        ("" if checkpoint_required else "; omitted: random weights"))
    add_override_argument(p)
    p.add_argument("--image-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="network input canvas in pixels; images are resized as in `dino eval`, placed top-left and "
                        "padded, with the padding mask as the second input (default: the recipe's evaluation size, "
                        "data.val_scale x data.val_max_size, e.g. 800 1333)")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check-reference", choices=REFERENCES, default="auto",
                   help="what the export check judges the artifact against: float64 (PyTorch float64 as the truth, "
                        "the tolerance scaled to PyTorch float32's own distance from it), float32 (PyTorch float32 "
                        "at a fixed tolerance) or auto (default: float64 where it is affordable, e.g. not R50 at "
                        "800x1333 on a CPU; the check line says which ran)")


def _add_graph_args(p: argparse.ArgumentParser, max_batch: int) -> None:
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis")
    p.add_argument("--max-batch", type=int, default=max_batch,
                   help=f"upper bound of the dynamic batch (default {max_batch})")
    p.add_argument("--fp16", action="store_true", help="float16 detector (post-processing stays float32)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check against the reference and write the file unchecked")


def register(subparsers) -> None:
    targets_line = "onnx (ONNX), openvino (OpenVINO IR), trt (TensorRT engine), aoti (AOTInductor package)"
    exp = subparsers.add_parser("export", help=f"export a trained model: {targets_line}",
                                description=f"Export a trained model to one of: {targets_line}.")
    targets = exp.add_subparsers(dest="target", required=True, metavar="TARGET")

    onnx_p = targets.add_parser("onnx", help="ONNX graph (images, mask) -> (boxes, scores, labels), standard or "
                                             "TensorRT-plugin")
    _add_model_args(onnx_p, checkpoint_required=True)
    onnx_p.add_argument("--deform-op", choices=("standard", "plugin"), default="standard",
                        help="standard: GridSample (any runtime); plugin: one DinoMSDeformAttn node per attention "
                             "(TensorRT with csrc/tensorrt)")
    _add_graph_args(onnx_p, max_batch=32)
    _add_check_args(onnx_p)
    onnx_p.add_argument("--output", default="model.onnx")
    onnx_p.set_defaults(func=_cmd_export_onnx)

    trt_p = targets.add_parser("trt", help="TensorRT engine from a checkpoint (via a checked ONNX graph) or from an "
                                           "exported ONNX file (needs `tensorrt` and a GPU)")
    _add_model_args(trt_p, checkpoint_required=False, recipe_required=False)
    trt_p.add_argument("--onnx", default=None, help="build from this exported ONNX file instead of --recipe/--checkpoint")
    trt_p.add_argument("--deform-op", choices=("standard", "plugin"), default="plugin",
                       help="graph to build from a checkpoint (default plugin: TensorRT's GridSample has given wrong "
                            "outputs on DETR graphs, NVIDIA/TensorRT#4813)")
    _add_graph_args(trt_p, max_batch=8)
    _add_check_args(trt_p)
    trt_p.add_argument("--plugin-lib", action="append", default=[], metavar="PATH",
                       help="libdino_trt_plugin.so; default: build/trt/libdino_trt_plugin.so, built with CMake from "
                            "csrc/tensorrt when missing")
    trt_p.add_argument("--tensorrt-root", default=None, help="TensorRT install root for building the plugin library")
    trt_p.add_argument("--output", default=None, help="engine file (default: model.engine, or the ONNX path with "
                                                      ".engine)")
    trt_p.add_argument("--workspace-gb", type=float, default=4.0)
    trt_p.add_argument("--timing-cache", default=None, help="timing cache file (default: next to the engine)")
    trt_p.add_argument("--verbose", action="store_true")
    trt_p.set_defaults(func=_cmd_export_trt)

    aoti_p = targets.add_parser("aoti", help="AOTInductor package (.pt2), loadable with torch._inductor.aoti_load_package")
    _add_model_args(aoti_p, checkpoint_required=True)
    aoti_p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    aoti_p.add_argument("--dynamic-batch", action="store_true")
    aoti_p.add_argument("--max-batch", type=int, default=16)
    aoti_p.add_argument("--no-verify", action="store_true", help="skip the check against eager PyTorch")
    _add_check_args(aoti_p)
    aoti_p.add_argument("--output", default="model.pt2")
    aoti_p.set_defaults(func=_cmd_export_aoti)

    ov_p = targets.add_parser("openvino", help="OpenVINO IR (model.xml + model.bin) for the CPU, converted from the "
                                               "checked ONNX graph: the plugin graph with dino's OpenVINO extension "
                                               "where it builds, else the standard graph")
    _add_model_args(ov_p, checkpoint_required=True)
    ov_p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis")
    ov_p.add_argument("--max-batch", type=int, default=32, help="upper bound of the dynamic batch (default 32)")
    ov_p.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32",
                      help="arithmetic the IR runs at, recorded in it (INFERENCE_PRECISION_HINT): f32 (default), "
                           "bf16 (CPUs with avx512_bf16 or AMX; checked at the bf16 tolerance) or int8 (NNCF "
                           "post-training quantisation calibrated on training images, the rest at bf16 where the "
                           "CPU has it; judged by validation AP against f32, --max-ap-drop)")
    ov_p.add_argument("--calibration-images", type=int, default=300,
                      help="int8: training images of the recipe to calibrate on (default 300)")
    ov_p.add_argument("--max-ap-drop", type=float, default=0.01,
                      help="int8: largest drop of validation AP below the f32 IR's that is written (default 0.01); "
                           "past it nothing is written")
    ov_p.add_argument("--no-verify", action="store_true",
                      help="skip the checks against PyTorch and write the IR unchecked (allows --precision bf16 on a "
                           "CPU without it)")
    _add_check_args(ov_p)
    ov_p.add_argument("--output", default="model.xml", help="the IR's .xml; its weights go beside it in .bin")
    ov_p.set_defaults(func=_cmd_export_openvino)

    from dino_export.bench import ALL_BACKENDS

    bench = subparsers.add_parser("bench", help="latency of every available inference backend on the same inputs")
    _add_model_args(bench, checkpoint_required=False)
    bench.add_argument("--batch", nargs="+", type=int, default=[1])
    bench.add_argument("--backends", nargs="+", default=None, choices=ALL_BACKENDS, metavar="BACKEND",
                       help=f"subset of: {' '.join(ALL_BACKENDS)} (default: all)")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--iters", type=int, default=10)
    bench.add_argument("--plugin-lib", action="append", default=[], metavar="PATH",
                       help="libdino_trt_plugin.so for the tensorrt backend (default: found or built as in "
                            "`dino export trt`)")
    bench.add_argument("--json", default=None, help="also write the results as JSON")
    bench.add_argument("--table", default=None, help="also write the table as text")
    bench.set_defaults(func=_cmd_bench)


@contextlib.contextmanager
def _check_failure_is_one_line(artifact: str = "the exported graph", reference: str = "PyTorch") -> Iterator[None]:
    """A failed export check is one line (exit 1: the artifact is wrong, not the user's input): what differed and
    where, that nothing was written, and how to write it anyway."""
    try:
        yield
    except GraphDisagrees as err:
        raise CheckFailure(f"{artifact} disagrees with {reference}: {err.detail}; nothing was written (--no-verify "
                           f"writes it unchecked)") from err
    except ExportCheckError as err:
        raise CheckFailure(f"{artifact} could not be checked: {err}; nothing was written (--no-verify writes it "
                           f"unchecked)") from err


def _load(args, half: bool = False):
    from dino_export.deploy_model import build_deploy_model, check_canvas_fits, check_image_size, evaluation_canvas

    if getattr(args, "max_batch", 1) < 1:  # torch.export's batch Dim would fail with an AssertionError
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.image_size is None:
        size, where = evaluation_canvas(args.recipe, args.overrides)
        print(where)
    else:
        size = check_image_size(args.image_size)
    if args.checkpoint is not None:  # a run's or checkpoint's folder: its model.safetensors (named on stderr)
        args.checkpoint = str(checkpoint_file(args.checkpoint))
    model, desc = build_deploy_model(args.recipe, args.checkpoint, half=half, overrides=args.overrides)
    check_canvas_fits(model.model, size)
    check_forward_fits(model.model, 1, *size, getattr(args, "device", None) or "cpu", f"canvas {size[0]}x{size[1]}")
    return model, desc, size


def _read_files(args) -> tuple:
    """The files the command reads, which no output may replace (:func:`dino.durable.check_output_file`): the
    checkpoint (a run's or checkpoint's folder resolved to its model.safetensors, kept in ``args`` for the load), a
    recipe given as a file, the ONNX file and plugin libraries of ``dino export trt``."""
    if args.checkpoint is not None and Path(args.checkpoint).is_dir():  # a missing one is named by the load
        args.checkpoint = str(checkpoint_file(args.checkpoint))
    recipe = args.recipe if args.recipe is not None and Path(args.recipe).is_file() else None
    return (args.checkpoint, recipe, getattr(args, "onnx", None), *getattr(args, "plugin_lib", []))


def _labels(model, args) -> dict[str, str]:
    """The class count and the checkpoint's category names, to be recorded in the exported artifact."""
    from dino_export.artifact_labels import model_labels

    return model_labels(model.model.num_classes, args.checkpoint)


def _print_checks(checks, notes) -> None:
    for check in checks:
        print(check.line())
    for note in notes:
        print(f"note: {note}")


def _export_onnx(args, output: str):
    from dino_export.onnx_export import export_onnx

    check_output_file(output, "--output", "model.onnx", inputs=_read_files(args), replaces=(".onnx",))
    model, desc, size = _load(args, half=args.fp16)
    with _check_failure_is_one_line():
        result = export_onnx(model, output, size, args.deform_op, args.dynamic_batch, args.max_batch,
                             verify=not args.no_verify, labels=_labels(model, args), reference=args.check_reference)
    _print_checks(result.checks, result.notes)
    plugin = f", {result.num_plugin_nodes} DinoMSDeformAttn plugin nodes" if result.num_plugin_nodes else ""
    batch = f"dynamic batch 1..{args.max_batch}" if result.dynamic_batch else "batch 1"
    checked = ("checked against PyTorch" + (" float32" if args.fp16 else "")) if result.checks else \
        "NOT checked (--no-verify)"
    print(f"wrote {result.path} ({desc}; {args.deform_op}{plugin}; {size[0]}x{size[1]}, {batch}"
          f"{', float16' if args.fp16 else ''}); onnx.checker passed; {checked}")
    return result.path


def _cmd_export_onnx(args) -> int:
    _export_onnx(args, args.output)
    return 0


def _cmd_export_trt(args) -> int:
    from dino_export.trt_export import build_checked_engine, plan_from_args, require_tensorrt

    if (args.onnx is None) == (args.recipe is None):
        raise UserError("dino export trt takes either --onnx FILE or --recipe R --checkpoint C")
    if args.recipe is not None and args.checkpoint is None:
        raise UserError("dino export trt --recipe needs --checkpoint (the weights to build the engine from)")
    if args.onnx is not None and not Path(args.onnx).is_file():
        raise UserError(f"ONNX file {args.onnx} " + ("is a folder; give the .onnx file" if Path(args.onnx).is_dir()
                                                     else "does not exist"))
    inputs = _read_files(args)
    engine = Path(args.output or (Path(args.onnx).with_suffix(".engine") if args.onnx else "model.engine"))
    check_output_file(engine, "--output", "model.engine", inputs=inputs, replaces=(".engine",))
    if args.onnx is None:  # the checked ONNX graph the engine is built from is written beside it
        check_output_file(engine.with_suffix(".onnx"), "--output", "model.onnx", inputs=inputs, replaces=(".onnx",))
    version = require_tensorrt()  # before a long ONNX export
    if args.onnx is not None:
        onnx_path = Path(args.onnx)
        output = args.output
    else:
        output = Path(args.output or "model.engine")
        onnx_path = _export_onnx(args, str(output.with_suffix(".onnx")))
    plan = plan_from_args(onnx_path, output, args.fp16, args.plugin_lib, args.workspace_gb, args.max_batch,
                          args.timing_cache, tensorrt_root=args.tensorrt_root)
    with _check_failure_is_one_line("the TensorRT engine", "ONNX Runtime"):
        path, notes = build_checked_engine(plan, verify=not args.no_verify, verbose=args.verbose)
    for note in notes:
        print(note if note.startswith("TensorRT batch") else f"note: {note}")
    print(f"wrote {path} (TensorRT {version}, from {onnx_path}"
          f"{', plugin ' + ', '.join(map(str, plan.plugin_libs)) if plan.plugin_libs else ''})")
    return 0


def _cmd_export_aoti(args) -> int:
    from dino_export.aoti import export_aoti

    check_device(args.device)
    check_output_file(args.output, "--output", "model.pt2", inputs=_read_files(args), replaces=(".pt2",))
    model, desc, size = _load(args)
    with _check_failure_is_one_line("the AOTInductor package"):
        path, checks = export_aoti(model, args.output, size, args.device, args.dynamic_batch, args.max_batch,
                                   verify=not args.no_verify, labels=_labels(model, args),
                                   reference=args.check_reference)
    _print_checks(checks, [] if checks else ["not checked against eager PyTorch (--no-verify): written unchecked"])
    print(f"wrote {path} ({desc}; {size[0]}x{size[1]} on {args.device})")
    return 0


def _cmd_export_openvino(args) -> int:
    from dino_export.openvino_export import export_openvino, weights_path

    inputs = _read_files(args)
    check_output_file(args.output, "--output", "model.xml", inputs=inputs, replaces=(".xml",))
    check_output_file(weights_path(args.output), "--output", "model.xml", inputs=inputs, replaces=(".bin",))
    int8 = _int8_plan(args) if args.precision == "int8" else None
    model, desc, size = _load(args)
    with _check_failure_is_one_line("the OpenVINO IR"):
        result = export_openvino(model, args.output, size, args.dynamic_batch, args.max_batch, args.precision,
                                 verify=not args.no_verify, labels=_labels(model, args),
                                 reference=args.check_reference, int8=int8)
    _print_checks(result.checks, result.notes)
    batch = f"dynamic batch 1..{args.max_batch}" if result.dynamic_batch else "batch 1"
    checked = "checked against PyTorch" if result.checks else "NOT checked (--no-verify)"
    print(f"wrote {result.path} and {weights_path(result.path)} ({desc}; {size[0]}x{size[1]}, {batch}, precision "
          f"{result.precision}); {checked}")
    return 0


def _int8_plan(args):
    from dino_export.deploy_model import resolve_recipe
    from dino_export.openvino_int8 import Int8Plan

    plan = Int8Plan(resolve_recipe(args.recipe, args.overrides)[1], args.calibration_images, args.max_ap_drop)
    plan.check()  # before the model is loaded
    return plan


def _cmd_bench(args) -> int:
    from dino_export.bench import format_table, nothing_ran, run_bench, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    inputs = _read_files(args)
    for flag, path, example in (("--json", args.json, "bench.json"), ("--table", args.table, "bench.txt")):
        if path is not None:
            check_output_file(path, flag, example, inputs=inputs)
    model, desc, size = _load(args)
    hw = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'CPU'}, " \
                                                                       f"{torch.get_num_threads()} threads"
    header = (f"dino bench: {desc}; canvas {size[0]}x{size[1]} (letterboxed inputs with mask); device {device} "
              f"({hw}); torch {torch.__version__}; {args.warmup} warm-up + {args.iters} timed calls")
    meta = {"model": desc, "image_size": list(size), "device": device, "hardware": hw, "torch": torch.__version__,
            "warmup": args.warmup, "iters": args.iters}

    def save(rows) -> None:
        # After every row, so a run cut short (timeout) still leaves its finished rows.
        if args.json:
            write_json(rows, meta, args.json)
        if args.table:
            from dino_export import files

            files.write_bytes((format_table(rows, header) + "\n").encode(), args.table)

    rows = run_bench(model, size, args.batch, args.backends, device, args.warmup, args.iters, args.plugin_lib,
                     on_row=save)
    print(format_table(rows, header))
    save(rows)
    if args.json:
        print(f"wrote {args.json}")
    failure = nothing_ran(rows)
    if failure is not None:  # nothing was measured: exit 2 with each reason, not 0
        raise UserError(failure)
    return 0
