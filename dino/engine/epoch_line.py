"""The one console line per epoch: the figures a person looks for, from the epoch's ``log.jsonl`` record.

    epoch 3/12 loss 18.42 (cls 0.5123 L1 0.3311 GIoU 0.6702) lr 1.0e-04 41.3 img/s 2m05s ETA 18m45s AP 0.312 AP50 0.556

The time is the epoch's training time; the ETA is for the whole run at this process's pace so far, evaluation
included. ``AP`` (``(EMA ...)``) and ``AP50`` appear after an evaluated epoch, ``skipped ...`` when steps or images
were skipped.

``cls``, ``L1`` and ``GIoU`` are the weighted class (focal), L1 and GIoU losses of the last decoder layer; ``loss`` is
the sum of every weighted term (all layers, encoder output, denoising). The full record stays in ``log.jsonl``
and is logged at DEBUG level.
"""
from __future__ import annotations

import math
import time

from dino.run_logs import MAIN_TERMS


class RunClock:
    """The ETA of the whole run from the wall time of the epochs this process has trained (evaluation included)."""

    def __init__(self, first_epoch: float, epochs: int) -> None:
        """``first_epoch``: where this process started, in epochs (2.5: half-way through the third); ``epochs``:
        the run's total."""
        self.first_epoch, self.epochs = first_epoch, epochs
        self.started = time.perf_counter()

    def eta_s(self, done: int) -> float | None:
        """Seconds left after ``done`` epochs of ``epochs``, at this process's mean pace; None before any progress."""
        trained = done - self.first_epoch
        if trained <= 0:
            return None
        return (time.perf_counter() - self.started) / trained * max(self.epochs - done, 0)


def format_duration(seconds: float | None) -> str:
    """``42s``, ``12m05s``, ``3h07m``, ``4d07h``; ``?`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def epoch_line(record: dict, epochs: int) -> str:
    """The line for one ``log.jsonl`` record (``epoch``, ``train``, ``lr``, ``images_per_s``, ``epoch_time_s``, and
    when present ``eta_s``, ``eval``, ``eval_ema``, ``skipped_steps``, ``skipped_images``) of a run of ``epochs``."""
    means = record.get("train") or {}
    terms = " ".join(f"{label} {_number(means.get(key))}" for key, label in MAIN_TERMS.items())
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"loss {_number(means.get('loss'))} ({terms})",
        f"lr {record['lr']:.1e}",
        f"{record['images_per_s']:.{1 if record['images_per_s'] < 100 else 0}f} img/s",
        format_duration(record["epoch_time_s"]),
        f"ETA {format_duration(record.get('eta_s'))}",
    ]
    stats, ema = record.get("eval"), record.get("eval_ema")
    if stats:
        with_ema = f" (EMA {ema['AP']:.3f})" if ema else ""
        parts.append(f"AP {stats['AP']:.3f}{with_ema} AP50 {stats['AP50']:.3f}")
    skipped = [f"{record[key]} {what}" for key, what in (("skipped_steps", "steps"), ("skipped_images", "images"))
               if record.get(key)]
    if skipped:  # non-finite steps so far (train.skip_nonfinite_steps), unreadable images this epoch
        parts.append("skipped " + " ".join(skipped))
    return " ".join(parts)
