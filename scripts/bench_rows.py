"""Shared pieces of the GPU-check benchmarks (scripts/bench_train_step.py, scripts/bench_deploy.py).

Imported as a sibling module (``python scripts/x.py`` puts scripts/ on sys.path); needs only torch and the repo.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from dino.config import ModelConfig
from dino.presets import get_preset


class RowWriter:
    """Rewrites a JSON file and a markdown table after every row, atomically, so a run cut at any point keeps every
    row that finished."""

    def __init__(self, json_path: Path | None, table_path: Path | None, columns: list[tuple[str, str]], meta: dict,
                 append: bool = False, derive: Callable[[list[dict]], None] | None = None):
        """``append``: keep the rows already in ``json_path`` (another process's part of the same table), and their
        meta under ``"earlier"``. ``derive``: fills columns computed across rows (e.g. :func:`official_speedups`),
        before every write."""
        self.json_path, self.table_path, self.columns, self.meta = json_path, table_path, columns, meta
        self.derive = derive
        self.rows: list[dict] = []
        if append and json_path is not None and json_path.exists():
            earlier = json.loads(json_path.read_text())
            self.rows = earlier["rows"]
            older = earlier["meta"].pop("earlier", [])
            kept = [m for m in [*older, earlier["meta"]] if m != meta]
            self.meta = {**meta, "earlier": kept} if kept else meta
        self._flush()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(" | ".join(f"{k}={_fmt(row.get(k))}" for k, _ in self.columns), flush=True)
        self._flush()

    def table(self) -> str:
        lines = ["| " + " | ".join(title for _, title in self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)

    def _flush(self) -> None:
        if self.derive is not None:
            self.derive(self.rows)
        if self.json_path is not None:
            _atomic_write(self.json_path, json.dumps({"meta": self.meta, "rows": self.rows}, indent=1) + "\n")
        if self.table_path is not None:
            header = ", ".join(f"{k} {v}" for k, v in self.meta.items() if k != "earlier")
            for meta in self.meta.get("earlier", []):
                header += "\n\nearlier rows: " + ", ".join(f"{k} {v}" for k, v in meta.items())
            _atomic_write(self.table_path, f"{header}\n\n{self.table()}\n")


# Deployment rows of the official code (scripts/official_peer.py): backend name -> the speed-up column over it.
OFFICIAL_DEPLOY = {"official_eager_fp32 (original kernel)": "x_official_original",
                   "official_eager_fp32 (PyTorch path)": "x_official_pytorch"}
SPEEDUP_COLUMNS = [("x_official_original", "x official (orig. kernel)"),
                   ("x_official_pytorch", "x official (PyTorch path)")]


def official_speedups(rows: list[dict]) -> None:
    """Sets each timed row's FPS over the FPS of each official row of the same batch (``SPEEDUP_COLUMNS``)."""
    for name, column in OFFICIAL_DEPLOY.items():
        reference = {r["batch"]: r["fps"] for r in rows if r.get("backend") == name and r.get("fps")}
        for row in rows:
            if row.get("fps") and row.get("batch") in reference:
                row[column] = row["fps"] / reference[row["batch"]]


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1 else f"{x:.2f}"
    return str(x)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    """torch / CUDA / device names for the tables' headers."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return env


def model_config(preset: str, tiny: bool) -> ModelConfig:
    """The preset's config; ``tiny`` (dry runs on a CPU) keeps its structure with ResNet-18, one encoder and two
    decoder layers, 30 queries and 10 denoising queries, so every code path runs in seconds."""
    cfg = get_preset(preset)
    if tiny:
        cfg = dataclasses.replace(
            cfg,
            backbone=dataclasses.replace(cfg.backbone, name="resnet18", pretrained=None),
            transformer=dataclasses.replace(cfg.transformer, hidden_dim=64, enc_layers=1, dec_layers=2,
                                            dim_feedforward=128, num_queries=30),
            denoising=dataclasses.replace(cfg.denoising, dn_number=10),
            num_select=20,
        )
    return cfg


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Wall milliseconds of ``iters`` calls of ``fn`` after ``warmup`` calls, each synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def deadline_passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline
