"""Per-device batch size and gradient accumulation chosen so the effective batch equals the recipe's.

The official recipes state a total batch of 16 (2 images x 8 GPUs for R50 4-scale, 1 x 16 for 5-scale). On another
number of processes we keep that effective batch by trading per-device batch for gradient-accumulation steps, so the
learning rate and schedule of the recipe stay valid unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass


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
    unless the processes cannot split the total evenly. Raises ValueError when the total cannot be matched exactly.
    """
    if total_batch_size < 1:
        raise ValueError(f"optim.total_batch_size must be >= 1, got {total_batch_size}")
    if num_processes < 1:
        raise ValueError(f"number of processes must be >= 1, got {num_processes}")
    if max_per_device is not None and max_per_device < 1:
        raise ValueError(f"optim.batch_size_per_device must be >= 1 or None, got {max_per_device}")
    if total_batch_size % num_processes:
        raise ValueError(
            f"optim.total_batch_size={total_batch_size} cannot be split evenly over {num_processes} processes; "
            f"set --set optim.total_batch_size=<a multiple of {num_processes}>"
        )
    per_process = total_batch_size // num_processes
    cap = per_process if max_per_device is None else min(max_per_device, per_process)
    # Largest divisor of the per-process share not above the cap: exact effective batch, fewest accumulation steps.
    per_device = max(d for d in range(1, cap + 1) if per_process % d == 0)
    return BatchPlan(per_device=per_device, num_processes=num_processes, accumulation=per_process // per_device)
