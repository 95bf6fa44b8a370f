"""The JSON-lines logs of a run folder: their names, and reading them back.

``log.jsonl`` holds one record per epoch (written by the engine after each epoch), ``steps.jsonl`` one record every
``train.log_every_steps`` optimizer steps (:mod:`dino.engine.step_log`). A run killed while appending leaves a last
line cut off; readers skip it. A run resumed from an earlier point appends records that go back in time; readers
keep the last timeline (:func:`timeline`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from dino import untrusted
from dino.errors import UserError
from dino.untrusted import Invalid

logger = logging.getLogger("dino")

EPOCH_LOG = "log.jsonl"
STEP_LOG = "steps.jsonl"
# The weighted loss terms recorded and shown besides the total, with their short labels: the class (focal), L1 and
# GIoU losses of the last decoder layer.
MAIN_TERMS = {"loss_ce": "cls", "loss_bbox": "L1", "loss_giou": "GIoU"}


MAX_LOG_BYTES = 2**30  # a run's log: about 150 bytes a line, so millions of steps
MAX_LINE_BYTES = 2**20  # one record: a few hundred bytes, an evaluated epoch with many categories a few kilobytes
_COUNTS = ("step", "epoch", "global_step")  # the counts the timeline orders records by
_NUMBERS = ("lr", "loss", *MAIN_TERMS)  # NaN allowed: json.dumps writes a non-finite mean as NaN


def read_json_lines(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist), each checked (:func:`check_record`). A last line
    that is not valid JSON (a write cut off by a crash) is skipped with a warning; an invalid line before it, a line
    longer than :data:`MAX_LINE_BYTES` or a file larger than :data:`MAX_LOG_BYTES` is a UserError naming the file,
    the line and the field."""
    path = Path(path)
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_LOG_BYTES:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes, more than the {MAX_LOG_BYTES:,} a run's log holds")
    records = []
    with open(path, "rb") as f:
        lines = iter(lambda: f.readline(MAX_LINE_BYTES + 1), b"")
        for number, line in enumerate(lines, 1):
            last = not f.peek(1)  # the line a crash may have cut off
            if len(line) > MAX_LINE_BYTES:
                raise UserError(f"{path}, line {number}: longer than {MAX_LINE_BYTES:,} bytes, not a record of a run")
            if not line.strip():
                continue
            try:
                record = untrusted.obj(untrusted.parse_json(line, MAX_LINE_BYTES), "the line")
            except Invalid as err:
                if last:
                    logger.warning("%s: its last line (%d) is cut off or not a JSON record; skipped", path, number)
                    continue
                why = "" if str(err).startswith(("not JSON", "the line is")) else f"{err}: "
                shown = untrusted.quote(line.rstrip(b"\r\n").decode(errors="replace")[:60])
                raise UserError(f"{path}, line {number}: not a JSON record ({why}{shown})") from None
            try:
                records.append(check_record(record))
            except Invalid as err:
                raise UserError(f"{path}, line {number}: {err}") from None
    return records


def check_record(record: dict) -> dict:
    """``record`` when its fields have their types: the counts (``step``, ``epoch``, ``global_step``) whole numbers,
    ``lr`` and the losses numbers, ``train`` / ``eval`` / ``eval_ema`` objects of numbers (``per_category``: of
    numbers or null); Invalid naming the field otherwise. Fields the project does not read are not checked."""
    for key in _COUNTS:
        if key in record:
            untrusted.count(record[key], key)
    for key in _NUMBERS:
        if key in record:
            _real(record[key], key)
    for section in ("train", "eval", "eval_ema"):
        values = record.get(section)
        if values is None:
            continue
        for key, value in untrusted.obj(values, section).items():
            if key == "per_category":
                for name, ap in untrusted.obj(value, f"{section}.per_category").items():
                    if ap is not None:
                        _real(ap, f"{section}.per_category[{untrusted.quote(name)}]")
            elif key in _NUMBERS or key in ("AP", "AP50", "AP75"):
                _real(value, f"{section}.{key}")
    return record


def _real(value, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"{field} is {untrusted.quote(value)}, not a number")


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
