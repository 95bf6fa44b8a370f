"""Atomic, durable file writes for exported artifacts: a temporary file next to the target, fsync, rename, fsync
of the folder. A crash leaves either the old file or the new one, never a torn one; a failed check leaves nothing.
The file gets the permissions of any new file (0666 less the umask, e.g. 0644), not the temporary file's 0600."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

# The process umask, read once (os.umask can only be read by setting it, which is not thread-safe at call time).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file's (or folder's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Moves the finished temporary file ``tmp`` onto ``path`` durably (fsync file, rename, fsync folder)."""
    path = Path(path)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp made it private; the artifact gets a new file's usual permissions
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
