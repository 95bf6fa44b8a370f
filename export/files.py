"""Atomic, durable file writes for exported artifacts: a temporary file next to the target, fsync, rename, fsync
of the folder. A crash leaves either the old file or the new one, never a torn one; a failed check leaves nothing.
The file gets the permissions of any new file (0666 less the umask, e.g. 0644), not the temporary file's 0600."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from dino.durable import fsync_path, give_new_file_mode
from dino.errors import UserError


def check_output_file(path: str | os.PathLike, flag: str, example: str, inputs: tuple = ()) -> Path:
    """Refuses, before any work, an output file that cannot be written: ``path`` is a folder (``example``: a file
    name to suggest in it, e.g. "model.onnx"), a parent is a file, the nearest existing folder is not writable, or
    ``path`` is one of the command's ``inputs`` (which the output would replace). UserError names ``flag`` and says
    what to give instead; returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the file to write, e.g. {flag} {path / example}")
    existing = next((p for p in path.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be written: {existing} is not writable; choose a writable folder")
    for given in inputs:
        if given is not None and path.exists() and Path(given).exists() and path.samefile(given):
            raise UserError(f"{flag} {path} is also this command's input: writing it would replace that input; "
                            f"choose another {flag}")
    return path


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Moves the finished temporary file ``tmp`` onto ``path`` durably (fsync file, rename, fsync folder)."""
    path = Path(path)
    give_new_file_mode(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


@contextlib.contextmanager
def staged(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` (same folder, so the final rename is atomic); the caller writes
    and checks it, then calls :func:`commit`. The temporary file is removed if the block raises or never commits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix if suffix is not None else path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Writes ``data`` to ``path`` atomically and durably."""
    with staged(path) as tmp:
        tmp.write_bytes(data)
        return commit(tmp, path)
