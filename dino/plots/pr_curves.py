"""``pr_curves.png`` beside an evaluation's ``results.json``: precision against recall at IoU 0.5 and 0.75, all
categories together (thick) and the categories with the most ground truth apart (thin), from the ``pr_curves`` data
of :func:`dino.data.evaluate_coco` (pycocotools' accumulated precision array)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dino.plots.figure import name_label, new_figure, save_png

PR_CURVES_PNG = "pr_curves.png"
SIZE_IN = (12.0, 5.0)  # inches: 1200 x 500 pixels


@dataclass
class DrawnPR:
    """The curves drawn (None in the data: nan), for tests and callers."""

    recall: list[float]  # (R,) pycocotools' recall thresholds
    ious: list[float]
    all: list[list[float]]  # one (R,) precision list per IoU: mean over the categories with ground truth
    categories: dict[str, list[list[float]]]  # name -> one (R,) list per IoU


def _nan(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def plot_pr_curves(pr: dict, path: str | Path, title: str = "") -> DrawnPR:
    """Draws ``pr`` (``stats["pr_curves"]``) into ``path``; returns what was drawn. Each legend gives the curve's AP
    at that IoU (its mean precision over the recall thresholds)."""
    drawn = DrawnPR(pr["recall"], pr["ious"], [_nan(c) for c in pr["all"]],
                    {name: [_nan(c) for c in curves] for name, curves in pr["categories"].items()})
    counts = pr.get("ground_truth", {})
    figure = new_figure(*SIZE_IN)
    axes = figure.subplots(1, len(drawn.ious), sharey=True)
    for i, (ax, iou) in enumerate(zip(axes, drawn.ious)):
        ap = f"AP{round(iou * 100)}"
        ax.plot(drawn.recall, drawn.all[i], color="black", linewidth=2.5,
                label=f"all categories ({ap} {_mean(drawn.all[i]):.3f})")
        for name, curves in drawn.categories.items():
            ax.plot(drawn.recall, curves[i], linewidth=1,
                    label=f"{name_label(name)}, {counts.get(name, '?')} boxes ({ap} {_mean(curves[i]):.3f})")
        ax.set(title=f"IoU {iou}", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower left")
    axes[0].set_ylabel("precision")
    figure.suptitle(title or "precision against recall (area all, 100 detections per image)")
    save_png(figure, path)
    return drawn
