"""Agreeing across processes that a step went non-finite, so every process stops (or skips) at the same step.

A NaN on one process used to raise there only; the others then blocked in the next collective until the process
group's timeout. Each micro-batch now costs one all-reduce of a single number (is anything non-finite here?); the
details (loss terms, image ids of every process) are gathered only when something is.
"""
from __future__ import annotations

import math

import torch
from accelerate.utils import gather_object


class NonFiniteStepError(RuntimeError):
    """A loss or gradient norm went NaN/inf; the message is the same on every process."""


def nonfinite_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The entries of ``terms`` (scalar tensors) that are NaN or inf, as floats."""
    values = {k: float(v.detach()) for k, v in terms.items()}
    return {k: v for k, v in values.items() if not math.isfinite(v)}


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (one all-reduce of one number)."""
    if accelerator.num_processes == 1:
        return flag
    count = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return accelerator.reduce(count, reduction="sum").item() > 0


def describe(accelerator, what: str, step: int, epoch: int, bad_terms: dict[str, float], image_ids: list[int]) -> str:
    """One message, identical on every process, naming the step, each process's non-finite terms and its images."""
    local = {"rank": accelerator.process_index, "terms": bad_terms, "image_ids": image_ids}
    reports = gather_object([local]) if accelerator.num_processes > 1 else [local]
    parts = []
    for report in sorted(reports, key=lambda r: r["rank"]):
        terms = ", ".join(f"{k}={v}" for k, v in sorted(report["terms"].items())) or "finite"
        parts.append(f"process {report['rank']}: {terms} (image ids {report['image_ids']})")
    return f"{what} at step {step} (epoch {epoch}): " + "; ".join(parts)
