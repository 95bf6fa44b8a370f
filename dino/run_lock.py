"""One writer per run folder: a run holds an OS file lock on the folder it writes for its whole life.

Two runs writing one folder (a resubmitted job, a second terminal) would write the same checkpoints, weights and
logs over each other. The first run to start holds ``<folder>/.dino-run.lock`` (:class:`filelock.FileLock`, an
``flock`` the kernel releases when the process ends however it ends) and records who it is in
``<folder>/.dino-run.json`` (pid, host, start time, command). A second run stops at once, before writing anything,
with one line naming the folder, the holder's pid and host, and what to do.

A run that was killed leaves its record behind (and, on a file system without ``flock``, its lock file): the next
run takes the lock over and says so. Under a soft lock the record's process must be gone from this host; a record
from another host is never taken over (its process cannot be checked from here).

Used by training (``train.output_dir``), ``dino eval --output-dir``, ``dino predict --output`` and the shapes
generator (``data.root``, while it writes it), on the main process only: the other processes of a launch do not
touch it. A process may take the lock of a folder it already holds again.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from dino.durable import make_output_dir, write_json
from dino.errors import UserError

logger = logging.getLogger("dino")

LOCK_FILE = ".dino-run.lock"  # in the folder; its record is the same name with .json
# How long a refused run waits for the holder's record (the holder writes it just after taking the lock).
_RECORD_WAIT_S = 2.0

# Folders this process holds: realpath -> (lock, depth), so that nested holds of one folder share one lock.
_held: dict[str, tuple[FileLock, int]] = {}


def first_process() -> bool:
    """Whether this process is the first of its launch (or runs alone), from the rank its launcher set (torchrun,
    MPI): for commands that take a lock before Accelerate has started the process group."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip() == "0"
    return True


@contextmanager
def run_lock(folder: str | os.PathLike, what: str, hold: bool = True, lock_file: str | os.PathLike | None = None
             ) -> Iterator[None]:
    """Holds the one-writer lock of ``folder`` for the ``with`` block; UserError (one line) if another run holds it.

    ``what``: the flag or field that named the folder (``train.output_dir``), for the message. ``hold=False`` (the
    other processes of a launch) does nothing. ``lock_file``: the lock, when not ``folder/.dino-run.lock`` (the shapes
    generator replaces ``data.root`` whole, so its lock sits beside it); its record is ``lock_file`` with ``.json``.
    """
    if not hold:
        yield
        return
    folder = Path(folder)
    path = Path(lock_file) if lock_file is not None else folder / LOCK_FILE
    key = os.path.realpath(path)
    if key in _held:
        lock, depth = _held[key]
        _held[key] = (lock, depth + 1)
        try:
            yield
        finally:
            _held[key] = (lock, _held[key][1] - 1)
        return
    make_output_dir(path.parent, what)  # a folder that cannot be created or written: one line naming `what`
    lock = _acquire(path, folder, what)
    _held[key] = (lock, 1)
    try:
        yield
    finally:
        del _held[key]
        path.with_suffix(".json").unlink(missing_ok=True)  # a record left behind means the run did not end this way
        lock.release()


def _acquire(path: Path, folder: Path, what: str) -> FileLock:
    lock = FileLock(path)
    record_file = path.with_suffix(".json")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        record = _holder_record(record_file)
        if not _gone(record):
            raise UserError(_busy_message(folder, what, record)) from None
        # Left by a killed run on a file system without flock (or still held by an orphan of its processes).
        path.unlink(missing_ok=True)
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(_busy_message(folder, what, _read_record(record_file))) from None
    stale = _read_record(record_file)
    if stale is not None:
        logger.warning("%s %s: took over the lock of run pid %s on %s (started %s), which ended without releasing "
                       "it (killed?)", what, folder, stale.get("pid"), stale.get("host"), stale.get("started"))
    write_json({"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}, record_file)
    return lock


def _read_record(record_file: Path) -> dict | None:
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _holder_record(record_file: Path) -> dict | None:
    """The record of the run holding the lock: waits briefly while it is missing or belongs to a process that is
    gone (the holder took the lock a moment ago and has not yet replaced its predecessor's record)."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        record = _read_record(record_file)
        if (record is not None and not _gone(record)) or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def _gone(record: dict | None) -> bool:
    """Whether ``record``'s process has ended (known only for a process of this host, and not on Windows, where
    ``os.kill(pid, 0)`` would end the process; its locks end with their process anyway)."""
    if record is None or record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if os.name == "nt":
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _busy_message(folder: Path, what: str, record: dict | None) -> str:
    holder = ("pid unknown: no readable record in the folder" if record is None
              else f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}")
    return (f"{what} {folder} is in use by another run ({holder}); only one run may write a folder: wait for that run "
            f"to end (or stop it), or choose another {what}")
