"""Per-device batch size and gradient accumulation chosen so the effective batch equals the recipe's.

The official recipes state a total batch of 16 (2 images x 8 GPUs for R50 4-scale, 1 x 16 for 5-scale). On another
number of processes we keep that effective batch by trading per-device batch for gradient-accumulation steps, so the
learning rate and schedule of the recipe stay valid unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from dino.errors import SharedUserError


@dataclass(frozen=True)
class BatchPlan:
    per_device: int
    num_processes: int
    accumulation: int

    @property
    def effective(self) -> int:
        return self.per_device * self.num_processes * self.accumulation

    def describe(self) -> str:
        return (
            f"effective batch {self.effective} = {self.per_device} per device x {self.num_processes} "
            f"process(es) x {self.accumulation} gradient-accumulation step(s)"
        )


def plan_batches(total_batch_size: int, num_processes: int, max_per_device: int | None = None) -> BatchPlan:
    """Chooses the largest per-device batch <= ``max_per_device`` that makes ``total_batch_size`` reachable exactly.

    ``max_per_device`` is the most images one device should hold (memory); None means no limit, i.e. no accumulation
    unless the processes cannot split the total evenly. Raises :class:`~dino.errors.SharedUserError` (every process
    computes the same plan, so one line is printed, not one per process) when a size is not a positive integer or the
    total cannot be matched exactly.
    """
    for name, value in (("optim.total_batch_size", total_batch_size), ("optim.batch_size_per_device", max_per_device)):
        if value is None and name == "optim.batch_size_per_device":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            unset = " (or none, to take it from optim.total_batch_size)" if name == "optim.batch_size_per_device" else ""
            raise SharedUserError(f"{name} must be an integer >= 1{unset}, got {value!r}; set --set {name}=<N>")
    if num_processes < 1:
        raise ValueError(f"number of processes must be >= 1, got {num_processes}")
    if total_batch_size % num_processes:
        raise SharedUserError(
            f"optim.total_batch_size={total_batch_size} cannot be split evenly over {num_processes} processes; "
            f"set --set optim.total_batch_size=<a multiple of {num_processes}>"
        )
    per_process = total_batch_size // num_processes
    cap = per_process if max_per_device is None else min(max_per_device, per_process)
    # Largest divisor of the per-process share not above the cap: exact effective batch, fewest accumulation steps.
    per_device = max(d for d in range(1, cap + 1) if per_process % d == 0)
    return BatchPlan(per_device=per_device, num_processes=num_processes, accumulation=per_process // per_device)


def check_batch_fits(plan: BatchPlan, num_images: int, source: str) -> None:
    """Refuses a plan whose optimizer step needs more images than the training set (``num_images``, read from
    ``source``) has: with ``drop_last`` an epoch yields ``num_images // (per_device x processes)`` micro-batches, and
    a step takes ``accumulation`` of them, so an epoch would end before its first full step (or, with accumulation,
    step on fewer images than the effective batch). Raises :class:`~dino.errors.SharedUserError` naming
    ``optim.total_batch_size``.
    """
    micro_batches = num_images // (plan.per_device * plan.num_processes)
    if micro_batches >= plan.accumulation:
        return
    largest = (num_images // plan.num_processes) * plan.num_processes
    multiple = f", a multiple of {plan.num_processes}" if plan.num_processes > 1 else ""
    fix = (f"set --set optim.total_batch_size=<at most {largest}{multiple}>" if largest >= plan.num_processes
           else f"use at most {num_images} process(es), or add images")
    raise SharedUserError(
        f"optim.total_batch_size={plan.effective} is larger than the training set of {source} ({num_images} "
        f"image(s)): one optimizer step needs {plan.effective} images ({plan.describe()}); {fix}"
    )
