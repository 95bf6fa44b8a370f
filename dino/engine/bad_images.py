"""What a training run does about an image it cannot use: stop with one line that says where the run can resume
from, or (``data.skip_unreadable``) count the skipped images for the epoch's log record.

Under several processes the stop is agreed: a process that cannot load its micro-batch used to exit alone, and the
others died in their next collective with a "Connection closed by peer" traceback that buried the one line. Each
micro-batch now costs one all-reduce of one number (could every process load it?), and every process raises the same
message at the same micro-batch. In training the same all-reduce also carries the termination signal (termination.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from dino.data import ImageError, UnreadableImageError
from dino.engine.checkpoint import latest_checkpoint
from dino.engine.checkpointer import Progress
from dino.engine.termination import TerminationSignals, agree
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


def agreed_batches(accelerator, batches, termination: TerminationSignals | None = None) -> Iterator:
    """``batches``, fetched in step on every process: when any process's fetch raises an
    :class:`~dino.data.ImageError`, every process raises one with the messages of all those that failed.

    With ``termination`` (training), the same all-reduce says whether any process got a termination signal; then
    every process ends the iteration before the same micro-batch (``termination.agreed`` says why)."""
    iterator = iter(batches)
    while True:
        try:
            batch, error = next(iterator), None
        except StopIteration:
            return  # the shards have equal lengths: every process ends here at once
        except ImageError as err:
            batch, error = None, err
        if agree(accelerator, error is not None, termination):
            raise _shared_error(accelerator, error)
        if termination is not None and termination.agreed:
            return
        yield batch


def _shared_error(accelerator, error: ImageError | None) -> ImageError:
    """The same error on every process: each failing process's message, in rank order."""
    local = [] if error is None else [(accelerator.process_index, isinstance(error, UnreadableImageError), str(error))]
    reports = sorted(gather_object(local)) if accelerator.num_processes > 1 else local
    kind = UnreadableImageError if any(unreadable for _, unreadable, _ in reports) else ImageError
    return kind("; ".join(message for _, _, message in reports))


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
