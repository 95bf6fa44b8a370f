"""A matplotlib figure without pyplot (no global state, no display) and its atomic, durable PNG file."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dino import untrusted
from dino.durable import replace_durably

DPI = 100  # a figure of (w, h) inches is a PNG of (w * DPI, h * DPI) pixels


def new_figure(width_in: float, height_in: float) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | Path) -> Path:
    """Writes ``figure`` to ``path`` (a temp file next to it, then moved into place durably); returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png", dpi=DPI)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def name_label(name: str, limit: int = 40) -> str:
    """A category name as drawn text: control characters escaped, at most ``limit`` characters, ``$`` taken
    literally (matplotlib would parse ``$...$`` as mathtext, and fail on a name that is not valid TeX)."""
    return untrusted.shorten(untrusted.printable(name), limit).replace("$", r"\$")
