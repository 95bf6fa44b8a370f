"""``steps.jsonl``: the losses and learning rate every ``train.log_every_steps`` optimizer steps, without TensorBoard.

One JSON line per logged step, appended by the main process and flushed to the disk (fsync) at each append, so a
crash loses at most the line being written. A run that resumes from step S first cuts the file back to the steps
up to S (the steps after it are trained again), so the file holds each step once.

A record: ``{"step": 40, "epoch": 2, "loss": 31.2, "loss_ce": 1.1, "loss_bbox": 0.9, "loss_giou": 1.3,
"lr": 1e-4}``; ``epoch`` is 1-based (the epoch the step belongs to), the losses are the weighted terms averaged over
the main process's micro-batches since the previous record, ``lr`` is the one the step used (warm-up included).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dino.durable import write_text_durably
from dino.run_logs import MAIN_TERMS, STEP_LOG, read_json_lines, timeline


class StepLog:
    """The step records of the run in ``output_dir``; on a process other than the main one it writes nothing."""

    def __init__(self, output_dir: str | Path, resumed_step: int, enabled: bool = True) -> None:
        """``resumed_step``: the optimizer step the run continues from (0 for a new run); records after it go."""
        self.path = Path(output_dir) / STEP_LOG
        self.enabled = enabled
        if enabled and self.path.exists():
            self._cut_back(resumed_step)

    def _cut_back(self, step: int) -> None:
        kept = [r for r in timeline(read_json_lines(self.path), "step") if r["step"] <= step]
        write_text_durably("".join(json.dumps(r) + "\n" for r in kept), self.path)

    def append(self, step: int, epoch: int, lr: float, means: dict[str, float]) -> None:
        """Appends step ``step`` of 1-based ``epoch`` with ``means`` (weighted loss terms, ``loss`` their sum)."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, **{k: means[k] for k in ("loss", *MAIN_TERMS) if k in means},
                  "lr": lr}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
