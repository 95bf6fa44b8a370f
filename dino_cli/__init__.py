"""The `dino` console script: one parser, subcommands contributed by the library and by export/.

Lives outside `dino/` because `dino/` never imports `export/`; this module sits above both.
Each command module exposes ``register(subparsers)``, which adds its subparser(s) and sets ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in help order.
COMMAND_MODULES = (
    "dino.convert",       # convert-official
    "dino.engine.cli",    # train, eval
    "export.cli",         # export onnx|trt|aoti, bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dino", description="DINO object detection: train, evaluate, convert, export.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        # Known, user-facing failures: one clear line, no traceback.
        print(f"dino {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
