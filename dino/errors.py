"""The project's one error type for user-facing failures.

Raise :class:`UserError` for anything the user can fix: a missing, corrupt or truncated file, a bad recipe field or
``--set`` value, an image that cannot be decoded, a download that cannot be reached. The ``dino`` CLI (and
``launch.py``) print it as one line and exit with status 2; every other exception (CUDA out of memory, real bugs)
keeps its traceback. It subclasses ValueError so callers that already catch bad values keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A failure the user can fix; its message names the file, field or value at fault."""


class SharedUserError(UserError):
    """A :class:`UserError` that every process of a launch raises alike, because it follows from the recipe and the
    launch alone (e.g. a total batch that the processes cannot split): under ``accelerate launch`` only the main
    process (RANK 0) prints it, so the user reads one line, not one per process."""


class CheckFailure(RuntimeError):
    """Something a command produced failed its own check (an exported graph that disagrees with PyTorch). Not the
    user's input, so the CLI exits with status 1, but in one line: the message says what differed, where, what was
    (not) written and how to go on, and a traceback would add nothing."""


class ArgumentTypeError(UserError, TypeError):
    """A :class:`UserError` for a Python API argument of the wrong type (``score_threshold="0.5"``), naming the
    argument; a TypeError too, so callers that catch the built-in error for a wrong type keep working."""
