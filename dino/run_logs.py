"""The JSON-lines logs of a run folder: their names, and reading them back.

``log.jsonl`` holds one record per epoch (written by the engine after each epoch), ``steps.jsonl`` one record every
``train.log_every_steps`` optimizer steps (:mod:`dino.engine.step_log`). A run killed while appending leaves a last
line cut off; readers skip it. A run resumed from an earlier point appends records that go back in time; readers
keep the last timeline (:func:`timeline`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dino.errors import UserError

logger = logging.getLogger("dino")

EPOCH_LOG = "log.jsonl"
STEP_LOG = "steps.jsonl"
# The weighted loss terms recorded and shown besides the total, with their short labels: the class (focal), L1 and
# GIoU losses of the last decoder layer.
MAIN_TERMS = {"loss_ce": "cls", "loss_bbox": "L1", "loss_giou": "GIoU"}


def read_json_lines(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist). A last line that is not valid JSON (a write
    cut off by a crash) is skipped with a warning; an invalid line before it is a UserError naming the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):
                logger.warning("%s: its last line (%d) is cut off or not a JSON record; skipped", path, number)
                continue
            raise UserError(f"{path}, line {number}: not a JSON record ({line[:60]!r})")
        records.append(record)
    return records


def timeline(records: list[dict], key: str) -> list[dict]:
    """The records of the last timeline, in order of ``key``: a record whose ``key`` is not above the previous one's
    (a run resumed from an earlier checkpoint, or started over) replaces the records from that point on."""
    kept: list[dict] = []
    for record in records:
        if key not in record:
            continue
        while kept and kept[-1][key] >= record[key]:
            kept.pop()
        kept.append(record)
    return kept
