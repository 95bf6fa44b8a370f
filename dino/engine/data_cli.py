"""``dino data check``: scan a recipe's training and validation sets before a long run.

    dino data check --recipe dino_r50_4scale_12ep --set data.root=/data/coco
    dino data check --recipe my_recipe.py --fast --split val

Prints a table per split (images, annotations, categories, problems by kind) and the problems themselves (each
naming its file). Exit status 1 when a problem would stop training, 0 otherwise, 2 for a bad recipe or ``--set``.
"""
from __future__ import annotations

import argparse
import os
import sys

from dino.config import add_override_argument
from dino.data import prepare_dataset, split_paths
from dino.data.check import check_split, format_report
from dino.engine.preflight import training_problems
from dino.engine.recipe import RECIPE_RUNS_AS_PYTHON, load_recipe
from dino.errors import UserError


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe file or name whose data.* fields name the dataset; "
                        f"{RECIPE_RUNS_AS_PYTHON}")
    add_override_argument(parser)
    parser.add_argument("--split", choices=("train", "val"), action="append", dest="splits",
                        help="check only this split (repeatable; default: train and val)")
    parser.add_argument("--fast", action="store_true",
                        help="only open each image (header: format and size) without decoding it: much faster, "
                        "but a truncated file passes")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="threads reading images (default: %(default)s)")
    parser.add_argument("--max-listed", type=int, default=20, metavar="N",
                        help="list at most N problems (default: %(default)s); the table counts them all")
    parser.add_argument("--num-processes", type=int, default=int(os.environ.get("WORLD_SIZE", "1")), metavar="N",
                        help="the number of training processes to check the batch plan for (default: %(default)s, "
                        "accelerate launch's WORLD_SIZE or 1)")


def run_check(args: argparse.Namespace) -> int:
    for flag, value, low in (("--workers", args.workers, 1), ("--max-listed", args.max_listed, 0),
                             ("--num-processes", args.num_processes, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    cfg = load_recipe(args.recipe, args.overrides)
    prepare_dataset(cfg.data)  # dataset="shapes": generated first, as training would
    reports = []
    for split in args.splits or ("train", "val"):
        images, annotations = split_paths(cfg.data, split)
        reports.append(check_split(split, images, annotations, fast=args.fast,
                                   skip_unreadable=cfg.data.skip_unreadable, workers=args.workers,
                                   progress=sys.stderr.isatty()))
    if "train" in (r.split for r in reports):
        # What training refuses before its first step, by the same code (dino.engine.preflight), with the train split.
        found = training_problems(cfg, args.num_processes, args.recipe,
                                  frozenset(r.split for r in reports if r.fatal()))
        by_split = {r.split: r for r in reports}
        for split, problems in found.items():
            by_split.get(split, by_split["train"]).problems.extend(problems)
    print(format_report(reports, limit=args.max_listed))
    fatal = [p for r in reports for p in r.fatal()]
    if fatal:
        unreadable = any(p.kind == "unreadable image" for p in fatal)
        print(f"{len(fatal)} problem(s) would stop training: fix them before training"
              + (" (or skip unreadable images: --set data.skip_unreadable=true)" if unreadable else ""))
        return 1
    print("no problem would stop training" + (" (mode --fast: images were not decoded)" if args.fast else ""))
    return 0


def register(subparsers) -> None:
    """Adds ``data`` (with its ``check`` subcommand) to the ``dino`` command."""
    data = subparsers.add_parser("data", help="check a recipe's dataset before training",
                                 description="Dataset tools.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = commands.add_parser(
        "check", help="scan the training and validation sets for problems that would stop or spoil a run",
        description="Scan a recipe's training and validation sets: every image opens and decodes, sizes match "
        "the json, boxes are valid, category and image ids exist, no file is listed twice. Exit status 1 when a "
        "problem would stop training.",
    )
    add_check_arguments(check)
    check.set_defaults(func=run_check)
