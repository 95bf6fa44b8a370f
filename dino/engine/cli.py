"""``dino train`` and ``dino eval``; ``launch.py`` is ``dino train`` (same entry: dino_cli).

    dino train recipes/quickstart.py --set optim.lr=2e-4 data.root=/data/shapes
    accelerate launch --num_processes 8 launch.py recipes/dino_r50_4scale_12ep.py --set data.root=/data/coco
    dino eval --recipe dino_r50_4scale_12ep --checkpoint checkpoint0011_4scale.pth --set data.root=/data/coco
    dino eval --recipe quickstart --onnx model.onnx      # or --openvino model.xml, --aoti model.pt2, --engine F
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from dino.config import Recipe, add_override_argument
from dino.durable import make_output_dir, refuse_input
from dino.engine.optim import check_schedule
from dino.errors import UserError
from dino.run_lock import first_process, run_lock
from dino.engine.recipe import RECIPE_RUNS_AS_PYTHON, available_recipes, iter_fields, load_recipe
from dino.engine.resume import interrupted_message
from dino.engine.termination import TerminationSignals

def _fields_epilog() -> str:
    lines = [f"  {path} = {value!r}" for path, value in iter_fields(Recipe())]
    return (
        "A recipe is a Python file recipes/<name>.py defining `def recipe() -> Recipe:` (dino.config); pass its path "
        f"or its name (available: {', '.join(available_recipes()) or 'none'}).\n"
        "Every field below can be overridden with --set FIELD=VALUE (defaults shown; recipes change some):\n"
        + "\n".join(lines)
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=f"recipe file (recipes/<name>.py) or recipe name; {RECIPE_RUNS_AS_PYTHON}")
    add_override_argument(parser)
    parser.add_argument(
        "--resume", metavar="PATH",
        help="continue from a checkpoint folder (output/checkpoints/step_*) or an output folder's latest checkpoint; "
        "without it, a run continues from train.output_dir's latest checkpoint (train.auto_resume)",
    )
    parser.add_argument(
        "--resume-anyway", action="store_true",
        help="resume even though the recipe differs from the checkpoint's (the new values apply, learning rates "
        "included); without it such a resume is refused with the list of differing fields",
    )
    parser.add_argument(
        "--finetune-from", metavar="PATH",
        help="start from the weights of a full checkpoint (model.safetensors or an official DINO .pth; official: "
        "--pretrain_model_path). Class heads and label book are re-initialised when the class count differs",
    )
    parser.add_argument(
        "--ignore-keys", nargs="+", default=[], metavar="REGEX",
        help="with --finetune-from: also skip weights whose key matches any regex (official: --finetune_ignore)",
    )
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe (after --set) and exit")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe file or name giving the model and the validation "
                        f"data; {RECIPE_RUNS_AS_PYTHON}")
    parser.add_argument(
        "--checkpoint", metavar="PATH",
        help="model.safetensors (ours), a training checkpoint or output folder (its model.safetensors), "
        "or an official DINO .pth checkpoint (converted in memory)",
    )
    # One flag per exported artifact kind (dino.predict.artifacts.KINDS), as dino predict's.
    parser.add_argument("--onnx", metavar="PATH", help="exported ONNX graph (standard deform op), run in ONNX Runtime "
                                                      "on the CPU")
    parser.add_argument("--openvino", metavar="PATH", help="OpenVINO IR (model.xml), run on the CPU at the precision "
                                                          "recorded in it")
    parser.add_argument("--aoti", metavar="PATH", help="AOTInductor package (.pt2) from dino export aoti")
    parser.add_argument("--engine", metavar="PATH", help="TensorRT engine from dino export trt (CUDA)")
    add_override_argument(parser)
    parser.add_argument(
        "--output-dir", metavar="DIR",
        help="where results.json, predictions.json and pr_curves.png go (default: <train.output_dir>/eval/<checkpoint "
        "name>, or <train.output_dir>/eval/<artifact file name>)",
    )


def _eval_model(args: argparse.Namespace) -> tuple[Path, str | None]:
    """``(path, kind)`` of the one model flag given (kind None: --checkpoint), checked without loading anything."""
    from dino.evaluation import artifact_suffix_kind, model_source
    from dino.predict.artifacts import KINDS

    flags = ["checkpoint", *(kind.name for kind in KINDS)]
    given = [flag for flag in flags if getattr(args, flag)]
    if len(given) != 1:
        choices = " / ".join("--" + flag for flag in flags)
        raise UserError(f"give exactly one model: {choices}" + (f" (got {', '.join('--' + g for g in given)})"
                                                                 if given else ""))
    flag = given[0]
    path = getattr(args, flag)
    if flag == "checkpoint":
        found = artifact_suffix_kind(path)
        if found is not None:
            raise UserError(f"--checkpoint {path} is an exported {found.what}: evaluate it with --{found.name} {path}")
        return model_source(path)
    return model_source(path, flag)


def _setup_logging() -> None:
    # Only the main process (RANK 0, set by accelerate launch) logs at INFO.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise


def run_train(args: argparse.Namespace) -> int:
    if args.ignore_keys and not args.finetune_from:
        raise UserError("--ignore-keys needs --finetune-from")
    cfg = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        for path, value in iter_fields(cfg):
            print(f"{path} = {value!r}")
        return 0
    check_schedule(cfg.optim)
    if args.finetune_from:  # the run's model.safetensors is written at its end: never over the weights it starts from
        source = Path(args.finetune_from)
        refuse_input(Path(cfg.train.output_dir) / "model.safetensors", "train.output_dir",
                     (source, source / "model.safetensors"))
    make_output_dir(cfg.train.output_dir, "train.output_dir")  # every process: all fail together
    _setup_logging()
    from dino.engine.train import train

    try:
        # train.termination_signals (SIGTERM...): a checkpoint, then Terminated (exit 75, dino_cli); not Ctrl-C.
        with TerminationSignals(cfg.train.termination_signals) as termination:
            train(cfg, resume=args.resume, finetune_from=args.finetune_from, ignore_keys=args.ignore_keys,
                  resume_anyway=args.resume_anyway, termination=termination)
    except KeyboardInterrupt:
        hint = None if cfg.train.auto_resume else "resume with --resume <that folder>"
        raise KeyboardInterrupt(interrupted_message(cfg.train.output_dir, hint)) from None
    return 0


def run_eval(args: argparse.Namespace) -> int:
    # The recipe and its --set first, as in every command; then the model, before anything is written, generated or
    # loaded (issue 35 item 13).
    cfg = load_recipe(args.recipe, args.overrides)
    path, kind = _eval_model(args)
    _setup_logging()
    from dino.evaluation import run_evaluation

    given = Path(getattr(args, kind or "checkpoint"))
    output_dir = args.output_dir or Path(cfg.train.output_dir) / "eval" / (given.stem if kind is None else given.name)
    make_output_dir(output_dir, "--output-dir" if args.output_dir else "train.output_dir")
    with run_lock(output_dir, "--output-dir", hold=first_process()):  # one evaluation writes a folder
        run_evaluation(cfg, path, kind, output_dir)
    return 0


def register(subparsers) -> None:
    """Adds ``train`` and ``eval`` to the ``dino`` command."""
    train = subparsers.add_parser(
        "train", help="train a recipe (multi-GPU: accelerate launch launch.py RECIPE)",
        description="Train DINO from a recipe. For several GPUs or machines run the same arguments through "
        "`accelerate launch [--num_processes N --num_machines M ...] launch.py`.",
        epilog=_fields_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    evaluate = subparsers.add_parser(
        "eval", help="COCO AP of a checkpoint (ours or official) or an exported artifact on a recipe's validation set",
        description="Evaluate a checkpoint (--checkpoint) or an exported artifact (--onnx, --openvino, --aoti, --engine; "
        "images letterboxed onto its fixed canvas as dino predict does) on the recipe's validation split and print "
        "the 12-line COCO AP table. A checkpoint runs distributed under accelerate launch.",
        epilog=_fields_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)
