"""The `dino` console script and ``launch.py``: one parser, one error policy.

Lives outside `dino/` because `dino/` never imports `export/`; this package sits above both. Each command module
exposes ``register(subparsers)``, which adds its subparser(s) and sets ``func``.

Errors: :class:`dino.errors.UserError` (a missing or corrupt file, a bad recipe field or ``--set`` value, a bad image)
is printed as one line ``dino <command>: error: <message>`` with exit status 2, like argparse's own usage errors.
Ctrl-C (KeyboardInterrupt) is one line ``dino <command>: interrupted; <where the last checkpoint is and how to
resume>`` with exit status 130 (128 + SIGINT, the shell's convention). A termination signal during training
(``train.termination_signals``: SIGTERM, SIGUSR1) is one line ``dino train: terminated by SIGTERM at step N; saved
<checkpoint>; ...`` with exit status 75 (EX_TEMPFAIL), after the checkpoint. Every other exception (CUDA out of
memory, real bugs) propagates with its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from dino import convert
from dino.engine import cli as engine_cli
from dino.engine import data_cli
from dino.engine.termination import TERMINATED_EXIT_CODE, Terminated
from dino.errors import CheckFailure, SharedUserError, UserError
from dino_cli import allocator
from dino_cli import plot as plot_cli
from dino_cli import predict as predict_cli
from dino_export import cli as export_cli

# Modules that contribute subcommands, in help order.
COMMAND_MODULES = (convert, engine_cli, data_cli, export_cli, predict_cli, plot_cli)


def _build(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog=prog, description="DINO object detection: train, evaluate, convert, export, predict.",
        epilog=allocator.HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser, sub.choices


def build_parser(prog: str = "dino") -> argparse.ArgumentParser:
    return _build(prog)[0]


def _close_progress_bars() -> None:
    """Ends the progress bar a failure interrupted, so the one-line message starts a line of its own."""
    for bar in list(tqdm._instances):
        bar.close()


def _say(line: str) -> None:
    """Writes ``line`` and its newline to stderr in one write: the processes of a launch share one stderr, and a line
    written in two pieces (as ``print`` does) can end up spliced with another process's line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _run(args: argparse.Namespace, error_prefix: str) -> int:
    try:
        rc = args.func(args)
    except UserError as err:
        _close_progress_bars()
        # Every process of a launch raises a SharedUserError alike: the main process's line is enough.
        if not isinstance(err, SharedUserError) or os.environ.get("RANK", "0") == "0":
            _say(f"{error_prefix}: error: {err}")
        return 2
    except CheckFailure as err:  # an artifact that failed its own check: one line, status 1
        _close_progress_bars()
        _say(f"{error_prefix}: error: {err}")
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C: one line (what was kept, how to go on), the shell's status 128 + SIGINT
        _close_progress_bars()
        _say(f"{error_prefix}: interrupted" + (f"; {err}" if str(err) else ""))
        return 130
    except Terminated as err:  # train.termination_signals: the checkpoint is saved; the rerun resumes from it
        _close_progress_bars()
        _say(f"{error_prefix}: {err}")
        return TERMINATED_EXIT_CODE
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    """Runs one ``dino`` command; returns its exit status (2 for a :class:`UserError` or a usage error)."""
    allocator.tune_malloc()  # before the first tensor: see dino_cli/allocator.py
    args = build_parser().parse_args(argv)
    target = getattr(args, "target", None) or getattr(args, "data_command", None)  # dino export onnx, dino data check
    return _run(args, f"dino {args.command}" + (f" {target}" if target else ""))


def launch_main(argv: list[str] | None = None) -> int:
    """Entry of ``launch.py`` (``accelerate launch launch.py RECIPE ...``): the ``dino train`` parser and command under
    the name ``launch.py``, so arguments, errors and exit codes are those of ``dino train``."""
    allocator.tune_malloc()
    train = _build("dino")[1]["train"]
    train.prog = "launch.py"
    train.epilog = "\n\n".join(e for e in (train.epilog, allocator.HELP) if e)
    return _run(train.parse_args(argv), "launch.py")


if __name__ == "__main__":
    sys.exit(main())
