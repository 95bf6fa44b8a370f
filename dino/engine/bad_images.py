"""What a training run does about an image it cannot use: stop with one line that says where the run can resume
from, or (``data.skip_unreadable``) count the skipped images for the epoch's log record."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from dino.data import ImageError, UnreadableImageError
from dino.engine.checkpoint import latest_checkpoint
from dino.engine.checkpointer import Progress
from dino.errors import UserError


@contextlib.contextmanager
def stop_on_bad_image(output_dir: str | Path, progress: Progress) -> Iterator[None]:
    """Re-raises an :class:`~dino.data.ImageError` (from the main process or a DataLoader worker) as one line: the
    image and why, the step reached, the last checkpoint (which a rerun resumes from) and what to do."""
    try:
        yield
    except ImageError as err:
        checkpoint = latest_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        where = (f"last checkpoint: {checkpoint} (rerunning resumes from it)" if checkpoint is not None
                 else f"no checkpoint in {output_dir} yet")
        fix = "run `dino data check --recipe RECIPE` (same --set) to list every such image"
        if isinstance(err, UnreadableImageError):
            fix += ", or --set data.skip_unreadable=true to skip them"
        # The epoch's progress bar would otherwise be left open, and the error printed on the end of its line.
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        raise UserError(f"{err}; training stopped at step {progress.global_step}; {where}; {fix}") from None


class SkippedImages:
    """Unreadable images skipped by ``dataset`` (``data.skip_unreadable``) since the last call, over all processes."""

    def __init__(self, accelerator, dataset) -> None:
        self.accelerator, self.dataset = accelerator, dataset
        self.seen = dataset.skipped_unreadable

    def since_last(self) -> int:
        """The count since the previous call, summed over the processes (every process must call it)."""
        total = self.dataset.skipped_unreadable
        new, self.seen = total - self.seen, total
        if self.accelerator.num_processes == 1:
            return new
        return int(self.accelerator.reduce(torch.tensor([new], device=self.accelerator.device), "sum").item())
