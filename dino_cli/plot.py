"""``dino plot RUN_DIR``: draw ``RUN_DIR/curves.png`` from the run's logs (training draws it too, after each evaluated
epoch and at the end).

    dino plot outputs/quickstart
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dino.plots.curves import CURVES_PNG, plot_run


def run_plot(args: argparse.Namespace) -> int:
    drawn = plot_run(args.run_dir)
    evaluated = f", AP of {len(drawn.eval_epochs)} evaluated epochs" if drawn.eval_epochs else ", no evaluation yet"
    print(f"{Path(args.run_dir) / CURVES_PNG}: {len(drawn.steps)} points up to step {drawn.steps[-1]} "
          f"(from {drawn.step_source}){evaluated}")
    return 0


def register(subparsers) -> None:
    """Adds ``plot`` to the ``dino`` command."""
    plot = subparsers.add_parser(
        "plot", help="draw a run's curves (losses, learning rate, AP) into RUN_DIR/curves.png",
        description="Draw RUN_DIR/curves.png: the total loss and the weighted class / L1 / GIoU losses of the last "
        "decoder layer against the step (from steps.jsonl, with epoch marks), the learning rate, AP / AP50 / AP75 "
        "against the epoch, and the AP of each category at the last evaluation (from log.jsonl).",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a training output folder (train.output_dir)")
    plot.set_defaults(func=run_plot)
