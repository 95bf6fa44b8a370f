"""``python -m dino.quickstart``: generate the shapes dataset, train the quickstart recipe on this machine, evaluate.

Prints the 12-line COCO AP table and the wall time, writes ``outputs/quickstart/model.safetensors``, draws the
detections on a few validation images, names the training curves (``curves.png``, drawn by training), and exits
with status 1 when AP50 is below ``--min-ap50`` (0.5).
Rerunning resumes an interrupted run (Ctrl-C: one line, exit 130) from its last epoch-end checkpoint; a finished
run is not trained again, its weights are evaluated again. A user error is one line with exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from dino.errors import UserError

# Freed large blocks stay in the heap instead of going back to the OS. Otherwise every new tensor page-faults its
# memory in again, which on some VMs costs more than the arithmetic: measured 9 s vs 0.47 s per training step here.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def _reexec_with_malloc_tunables(argv: list[str]) -> None:
    """Restarts this command with MALLOC_TUNABLES (glibc reads them only at process start); no-op when set."""
    if not sys.platform.startswith("linux") or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES) if t)
    os.execve(sys.executable, [sys.executable, "-m", "dino.quickstart", *argv], {**os.environ, "GLIBC_TUNABLES": tunables})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                        help="override fields of recipes/quickstart.py, e.g. --set optim.epochs=4")
    parser.add_argument("--resume-anyway", action="store_true",
                        help="continue the run in train.output_dir even though --set changed its recipe (as dino train)")
    parser.add_argument("--min-ap50", type=float, default=0.5, help="exit with status 1 below this AP50 (default 0.5)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UserError as err:
        _close_progress_bars()
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """Ends the progress bar a failure interrupted, so the one-line message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)

    started = time.perf_counter()
    from dino.data import format_ap_table, generate_shapes_dataset
    from dino.engine.evaluate import evaluate_checkpoint
    from dino.engine.recipe import load_recipe
    from dino.engine.resume import AlreadyFinished, interrupted_message
    from dino.engine.train import train
    from dino.plots.curves import CURVES_PNG

    cfg = load_recipe("quickstart", args.overrides)
    data = cfg.data
    root = generate_shapes_dataset(
        data.root, data.shapes_train_images, data.shapes_val_images, data.shapes_image_size, seed=data.shapes_seed
    )
    print(f"shapes dataset: {data.shapes_train_images} train + {data.shapes_val_images} val images of "
          f"{data.shapes_image_size} px in {root} ({time.perf_counter() - started:.1f} s)")
    try:
        result = train(cfg, resume_anyway=args.resume_anyway)
    except AlreadyFinished as done:  # rerun of a finished quickstart: its weights are evaluated again, not retrained
        print(f"quickstart: {done}")
        result = {"eval": None}
    except KeyboardInterrupt:
        _close_progress_bars()
        hint = ("rerun the same command to resume from it" if cfg.train.auto_resume
                else "rerun without train.auto_resume=false to resume from it")
        print(f"quickstart: interrupted; {interrupted_message(cfg.train.output_dir, hint)}", file=sys.stderr)
        return 130
    weights = Path(cfg.train.output_dir) / "model.safetensors"
    stats = result["eval"]
    if stats is None:
        # Training did not evaluate (train.eval_every_epochs=0): the quickstart's answer is the final weights' AP.
        stats = evaluate_checkpoint(cfg, weights, Path(cfg.train.output_dir) / "eval" / "final")
    else:
        print(format_ap_table(stats))
    wall = time.perf_counter() - started
    print(f"quickstart: AP {stats['AP']:.3f}, AP50 {stats['AP50']:.3f} on {stats['num_images']} val images; "
          f"wall time {wall / 60:.1f} min ({wall:.0f} s); weights in {weights}")
    _predict_examples(cfg, weights)
    curves = Path(cfg.train.output_dir) / CURVES_PNG
    if curves.is_file():
        print(f"training curves (losses, learning rate, AP): {curves}; redrawn by `dino plot {cfg.train.output_dir}`")
    if stats["AP50"] < args.min_ap50:
        print(f"quickstart: AP50 {stats['AP50']:.3f} is below {args.min_ap50}", file=sys.stderr)
        return 1
    return 0


def _predict_examples(cfg, weights_path: Path, count: int = 4) -> None:
    """Runs ``dino predict``'s pipeline on the first ``count`` validation images and says where the pictures are."""
    from dino.predict.detector import Detector
    from dino.predict.files import predict_files

    files = sorted((Path(cfg.data.root) / cfg.data.val_images).glob("*"))[:count]
    output_dir = Path(cfg.train.output_dir) / "predict"
    summary = predict_files(Detector.load(weights_path, cfg, "cpu"), files, output_dir, batch_size=count)
    print(f"detections drawn on {len(summary.images)} validation images: {output_dir} (predictions.json and pictures); "
          f"the same with `dino predict --recipe quickstart --checkpoint {weights_path} IMAGES...`")


if __name__ == "__main__":
    _reexec_with_malloc_tunables(sys.argv[1:])
    sys.exit(main())
