"""Reading a file as untrusted input: one size limit, one nesting limit, typed fields with bounds, short quotes.

Every file the project reads back may come from someone else (a shared run folder, a downloaded checkpoint, an
exported graph), so each format is read through a validator built from these pieces: checkpoint records
(:mod:`dino.engine.checkpoint`, :mod:`dino.engine.restore`), run logs (:mod:`dino.run_logs`), class names of
weights and exported artifacts (:mod:`dino.predict.labels`, :mod:`dino.model_loading`), the recipe recorded in
weights (:mod:`dino.predict.recipe`). A value that breaks a rule raises :class:`Invalid` with the field and the
value quoted at most :data:`QUOTE_CHARS` characters long; the caller turns it into the one :class:`UserError` line
that names the file. The table of what happens to each hostile file is ``docs/user_errors.md``.
"""
from __future__ import annotations

import json
import math
import reprlib
import unicodedata
from pathlib import Path
from typing import Any

from dino.errors import UserError

MAX_JSON_BYTES = 16 * 2**20  # a checkpoint record, scheduler state or metadata value: kilobytes in practice
MAX_DEPTH = 32  # nesting of objects and lists; the deepest file the project writes nests 4 levels
QUOTE_CHARS = 80  # the longest quote of a value in an error line
MAX_NAME_CHARS = 200  # a class name
MAX_CLASSES = 100_000  # class slots of a model (labels are category ids, so also the largest id + 1)
MAX_COUNT = 2**53  # counts read from a file (steps, batches, epochs): exact in JSON's doubles


class Invalid(ValueError):
    """A value of an untrusted file that breaks its format's rules; the message names the field and the value."""


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` of at most about ``limit`` characters (reprlib: long strings and containers abbreviated with
    ``...``, nesting cut at 3 levels), so that a 10 MB or deeply nested value still makes a short error line."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlevel, short.maxlist, short.maxdict = 3, 4, 4
    text = short.repr(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    if isinstance(value, str) and len(value) > limit:
        text += f" ({len(value):,} characters)"
    return text


def shorten(line: str, limit: int = 200) -> str:
    """``line`` cut to ``limit`` characters (ending ``...``): an error line that quotes what a file holds."""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def parse_json(data: bytes | str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``data``; Invalid when it is larger than ``max_bytes``, not JSON (or not UTF-8), or nested
    deeper than ``max_depth``. The parser's own recursion guard stops a pathological nesting before the depth is
    measured (iteratively) on the parsed value, so no input reaches Python's recursion limit."""
    if len(data) > max_bytes:
        raise Invalid(f"{len(data):,} bytes, more than the {max_bytes:,} such a file can hold")
    try:
        value = json.loads(data)
    except RecursionError:
        raise Invalid(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as err:
        raise Invalid(f"not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise Invalid(f"not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if depth(value) > max_depth:
        raise Invalid(f"nested deeper than {max_depth} levels")
    return value


def depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (0 for a scalar), measured without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in item)
    return deepest


def read_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of the file ``path``; UserError ``<path>: not a valid <what> (<reason>)`` when it is larger
    than ``max_bytes`` (checked before reading it), unreadable or breaks :func:`parse_json`'s limits."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Invalid(f"{size:,} bytes, more than the {max_bytes:,} such a file can hold")
        return parse_json(path.read_bytes(), max_bytes)
    except (OSError, Invalid) as err:
        raise UserError(f"{path}: not a valid {what} ({err})") from None


def obj(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"{where} is a {type(value).__name__}, not an object")
    return value


def count(value: Any, field: str, maximum: int = MAX_COUNT, minimum: int = 0) -> int:
    """``value`` when it is an int in ``minimum..maximum`` (a bool is not); Invalid naming ``field`` otherwise."""
    if type(value) is not int or not minimum <= value <= maximum:
        raise Invalid(f"{field} is {quote(value)}, not a whole number in {minimum}..{maximum:,}")
    return value


def number(value: Any, field: str) -> float:
    """``value`` as a float when it is a finite int or float (not a bool); Invalid naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(f"{field} is {quote(value)}, not a finite number")
    return float(value)


def text(value: Any, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{field} is {quote(value)}, not a string")
    if len(value) > max_chars:
        raise Invalid(f"{field} is {quote(value)}, longer than {max_chars} characters")
    return value


def categories(value: Any, field: str = "categories") -> list[dict]:
    """``value`` checked as ``[{"id": int, "name": str}, ...]``: at most :data:`MAX_CLASSES` entries, ids in
    0..MAX_CLASSES-1, names of at most :data:`MAX_NAME_CHARS` characters (control characters kept: they are data,
    replaced only where drawn or printed, :func:`printable`). Returns fresh dicts of exactly those two keys."""
    if not isinstance(value, list):
        raise Invalid(f"{field} is {quote(value)}, not a list of {{id, name}}")
    if len(value) > MAX_CLASSES:
        raise Invalid(f"{field} lists {len(value):,} categories, more than {MAX_CLASSES:,}")
    checked = []
    for i, entry in enumerate(value):
        entry = obj(entry, f"{field}[{i}]")
        checked.append({"id": count(entry.get("id"), f"{field}[{i}].id", MAX_CLASSES - 1),
                        "name": text(entry.get("name"), f"{field}[{i}].name", MAX_NAME_CHARS)})
    return checked


# Characters that move the cursor, end a line, change the terminal's state or reorder text: C0 and C1 controls,
# DEL, the Unicode line and paragraph separators, and the bidirectional overrides and isolates.
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


def is_control(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Zl", "Zp") or ord(char) in _BIDI


def has_control(value: str) -> bool:
    return any(is_control(c) for c in value)


def printable(value: str) -> str:
    """``value`` with each control character (:func:`is_control`) written as its escape (``\\r``, ``\\x1b``,
    ``\\u202e``): for drawings and console lines, where it would break the text layout or the terminal. JSON outputs
    keep the name as it is."""
    if not has_control(value):
        return value
    return "".join(c.encode("unicode_escape").decode("ascii") if is_control(c) else c for c in value)
