"""``curves.png`` of a run folder: what ``dino plot RUN_DIR`` draws, and training after each evaluated epoch.

    +----------------------+----------------------+----------------------+
    | total loss vs step   | class / L1 / GIoU    | learning rate        |
    | (epoch marks)        | vs step              | vs step              |
    +----------------------+----------------------+----------------------+
    | AP / AP50 / AP75     | AP of each category at the last evaluation   |
    | vs epoch             | (bars, highest first)                        |
    +----------------------+----------------------------------------------+

The step panels come from ``steps.jsonl`` (every ``train.log_every_steps`` steps); a run without it (logging every
step off, or a run from before it existed) is drawn from ``log.jsonl``'s epoch means at each epoch's last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from dino.errors import UserError
from dino.plots.figure import name_label, new_figure, save_png
from dino.run_logs import EPOCH_LOG, MAIN_TERMS, STEP_LOG, read_json_lines, timeline

CURVES_PNG = "curves.png"
SIZE_IN = (15.0, 8.0)  # inches: 1500 x 800 pixels
AP_NAMES = ("AP", "AP50", "AP75")


@dataclass
class DrawnCurves:
    """The series drawn, as read from the logs (for tests and callers)."""

    step_source: str  # STEP_LOG or EPOCH_LOG: where the step panels come from
    steps: list[int] = field(default_factory=list)  # x of the step panels
    losses: dict[str, list[float]] = field(default_factory=dict)  # "loss" and MAIN_TERMS keys, at `steps`
    lr: list[float] = field(default_factory=list)  # at `steps`
    epochs: list[int] = field(default_factory=list)  # the logged epochs (1-based)
    epoch_ends: list[int] = field(default_factory=list)  # the last step of each (the marks)
    epoch_losses: list[float] = field(default_factory=list)  # log.jsonl's mean total loss of each, at epoch_ends
    eval_epochs: list[int] = field(default_factory=list)
    ap: dict[str, list[float]] = field(default_factory=dict)  # AP_NAMES (and "AP EMA"), at eval_epochs; nan: -1
    per_category: dict[str, float] = field(default_factory=dict)  # last evaluation, highest first, with ground truth
    per_category_epoch: int | None = None


def read_curves(run_dir: str | Path) -> DrawnCurves:
    """The series of ``run_dir``'s ``log.jsonl`` and ``steps.jsonl`` (last timeline of each, see run_logs)."""
    run_dir = Path(run_dir)
    # The records' types are checked by read_json_lines (dino.run_logs.check_record); a field missing is no point.
    epochs = [r for r in timeline(read_json_lines(run_dir / EPOCH_LOG), "epoch") if "global_step" in r]
    steps = timeline(read_json_lines(run_dir / STEP_LOG), "step")
    step_keys = ("loss", *MAIN_TERMS)
    if steps:
        drawn = DrawnCurves(STEP_LOG, [r["step"] for r in steps],
                            {k: [_value(r.get(k)) for r in steps] for k in step_keys}, [_value(r.get("lr")) for r in steps])
    else:
        drawn = DrawnCurves(EPOCH_LOG, [r["global_step"] for r in epochs],
                            {k: [_value((r.get("train") or {}).get(k)) for r in epochs] for k in step_keys},
                            [_value(r.get("lr")) for r in epochs])
    drawn.epochs = [r["epoch"] for r in epochs]
    drawn.epoch_ends = [r["global_step"] for r in epochs]
    drawn.epoch_losses = [_value((r.get("train") or {}).get("loss")) for r in epochs]
    evaluated = [r for r in epochs if r.get("eval")]
    drawn.eval_epochs = [r["epoch"] for r in evaluated]
    drawn.ap = {name: [_ap(r["eval"].get(name)) for r in evaluated] for name in AP_NAMES}
    if any(r.get("eval_ema") for r in evaluated):
        drawn.ap["AP EMA"] = [_ap((r.get("eval_ema") or {}).get("AP")) for r in evaluated]
    if evaluated:
        last = evaluated[-1]
        scored = {k: v for k, v in (last["eval"].get("per_category") or {}).items() if v is not None and v >= 0}
        drawn.per_category = dict(sorted(scored.items(), key=lambda kv: -kv[1]))
        drawn.per_category_epoch = last["epoch"]
    return drawn


def _value(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _ap(v) -> float:
    """AP as drawn: pycocotools' -1 (no ground truth in that range) is no point."""
    v = _value(v)
    return v if v >= 0 else math.nan


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> DrawnCurves:
    """Draws ``run_dir``'s curves into ``path`` (default ``run_dir/curves.png``); returns what was drawn.
    UserError when ``run_dir`` is not a folder or holds neither log."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder (expected a run folder, the train.output_dir of a run)")
    drawn = read_curves(run_dir)
    if not drawn.steps:
        raise UserError(f"{run_dir} has no training records yet ({EPOCH_LOG} or {STEP_LOG} with at least one "
                        "line); is it the train.output_dir of a run?")
    figure = new_figure(*SIZE_IN)
    grid = figure.add_gridspec(2, 3)
    step_axes = [figure.add_subplot(grid[0, i]) for i in range(3)]
    _draw_losses(step_axes[0], step_axes[1], drawn)
    _draw_lr(step_axes[2], drawn)
    for ax in step_axes:
        _mark_epochs(ax, drawn.epochs, drawn.epoch_ends)
    _draw_ap(figure.add_subplot(grid[1, 0]), drawn)
    _draw_per_category(figure.add_subplot(grid[1, 1:]), drawn)
    figure.suptitle(f"{run_dir.resolve().name}: step {drawn.steps[-1]}, {len(drawn.epochs)} epochs logged")
    save_png(figure, path or run_dir / CURVES_PNG)
    return drawn


def _draw_losses(total_ax, terms_ax, drawn: DrawnCurves) -> None:
    where = "every logged step" if drawn.step_source == STEP_LOG else "epoch means"
    total_ax.plot(drawn.steps, drawn.losses["loss"], color="black", linewidth=1, label=f"total ({where})")
    if drawn.step_source == STEP_LOG and drawn.epoch_ends:
        total_ax.plot(drawn.epoch_ends, drawn.epoch_losses, "o", color="tab:red", markersize=4, label="epoch mean")
    total_ax.set(title="total loss (all weighted terms); top: epoch ends", xlabel="step")
    total_ax.legend(fontsize="small")
    for key, label in MAIN_TERMS.items():
        terms_ax.plot(drawn.steps, drawn.losses[key], linewidth=1, label=label)
    terms_ax.set(title="last decoder layer: weighted class, L1, GIoU", xlabel="step")
    terms_ax.legend(fontsize="small")


def _draw_lr(ax, drawn: DrawnCurves) -> None:
    ax.plot(drawn.steps, drawn.lr, color="tab:purple", linewidth=1)
    if all(v > 0 for v in drawn.lr):  # NaN (a missing lr) is not > 0: linear
        ax.set_yscale("log")
    ax.set(title="learning rate (transformer)", xlabel="step")


def _mark_epochs(ax, epochs: list[int], ends: list[int]) -> None:
    """A dotted line at the last step of each epoch, numbered on the top axis (every k-th of many)."""
    for end in ends:
        ax.axvline(end, color="grey", linewidth=0.6, linestyle=":")
    every = max(1, math.ceil(len(ends) / 12))
    top = ax.secondary_xaxis("top")
    top.set_xticks(ends[every - 1::every], [str(e) for e in epochs[every - 1::every]], fontsize=7)
    top.tick_params(length=2, pad=1, colors="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _draw_ap(ax, drawn: DrawnCurves) -> None:
    ax.set(title="COCO box AP (validation)", xlabel="epoch", ylim=(0, 1))
    if not drawn.eval_epochs:
        ax.text(0.5, 0.5, "no evaluated epoch\n(train.eval_every_epochs)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
        return
    for name, values in drawn.ap.items():
        ax.plot(drawn.eval_epochs, values, "o-" if name != "AP EMA" else "o--", markersize=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _draw_per_category(ax, drawn: DrawnCurves) -> None:
    if not drawn.per_category:
        ax.set(title="AP per category")
        ax.text(0.5, 0.5, "no evaluation with ground truth yet", ha="center", va="center", transform=ax.transAxes,
                color="grey")
        return
    names, values = list(drawn.per_category), list(drawn.per_category.values())
    bars = ax.bar(range(len(names)), values, color="tab:blue")
    if len(names) <= 20:
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(range(len(names)), [name_label(name) for name in names], rotation=90 if len(names) > 8 else 0,
                  fontsize=6 if len(names) > 30 else "small")
    ax.set(title=f"AP per category at epoch {drawn.per_category_epoch} (IoU .50:.95)", ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)

