"""Where a run stands (:class:`Progress`) and what each of its checkpoints holds (:class:`Checkpointer`)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dino.durable import no_space_error
from dino.engine.batching import BatchPlan
from dino.engine.checkpoint import EMA_STATE, SCHEDULER, save_training_state
from dino.weights import save_weights

logger = logging.getLogger("dino.engine")


@dataclass
class Progress:
    """The position of a run; saved as ``progress.json`` in each checkpoint (checked on reading:
    :func:`dino.engine.checkpoint.check_progress`)."""

    epoch: int = 0  # the epoch in progress (0-based); after an epoch-end checkpoint, the next one
    batches_in_epoch: int = 0  # micro-batches of this process already done in that epoch
    global_step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    skipped_steps: int = 0  # steps skipped as non-finite (train.skip_nonfinite_steps)
    # The main process's running sums of the weighted loss terms over this epoch's finite micro-batches so far, and
    # how many micro-batches they sum: a run resumed mid-epoch carries them on, so log.jsonl's epoch means cover the
    # whole epoch. Empty after an epoch-end checkpoint.
    loss_sums: dict[str, float] = field(default_factory=dict)
    losses_counted: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(d["epoch"], d["batches_in_epoch"], d["global_step"], d.get("skipped_steps", 0),
                   dict(d.get("loss_sums", {})), d.get("losses_counted", 0))


class Checkpointer:
    """Writes training-state checkpoints and the final weights of one run, with the weights' metadata."""

    def __init__(self, accelerator, output_dir: Path, model, ema, plan: BatchPlan, keep: int, recipe: dict,
                 metadata: dict[str, str], *, scheduler) -> None:
        self.accelerator, self.output_dir, self.model, self.ema = accelerator, Path(output_dir), model, ema
        self.plan, self.keep, self.recipe, self.metadata = plan, keep, recipe, metadata
        self.scheduler = scheduler
        self.last_saved: tuple[dict, Path] | None = None  # (progress as a dict, folder) of the latest save

    def _weights(self) -> dict[str, dict]:
        weights = {"model.safetensors": self.accelerator.unwrap_model(self.model).state_dict()}
        if self.ema is not None:
            weights["model_ema.safetensors"] = self.ema.module.state_dict()
        return weights

    def _documents(self) -> dict[str, dict]:
        """The LR scheduler's and the EMA's state as JSON, written by the project rather than Accelerate's
        ``register_for_checkpointing``, whose pickles ``load_state`` unpickles without restriction."""
        documents = {SCHEDULER: scheduler_state(self.scheduler)}
        if self.ema is not None:
            documents[EMA_STATE] = {"n_averaged": int(self.ema.n_averaged)}
        return documents

    def save(self, progress: Progress, epoch_end: bool) -> Path:
        """A checkpoint of the whole training state (every process must call it)."""
        record = {**asdict(progress), "batch_plan": [self.plan.per_device, self.plan.num_processes],
                  "recipe": self.recipe}
        path = save_training_state(self.accelerator, self.output_dir, record, self._weights(), keep=self.keep,
                                   epoch_end=epoch_end, metadata=self.metadata, documents=self._documents())
        logger.info("saved %s", path)
        self.last_saved = (asdict(progress), path)
        return path

    def save_final(self) -> None:
        """``model.safetensors`` (and ``model_ema.safetensors``) in the output folder, on the main process."""
        if self.accelerator.is_main_process:
            for name, state in self._weights().items():
                try:
                    save_weights(state, self.output_dir / name, self.metadata)  # its temp file is removed on failure
                except Exception as err:  # OSError, or safetensors' own error carrying the OS message
                    user_error = no_space_error(err, self.output_dir / name)
                    if user_error is None:
                        raise
                    raise user_error from None


def scheduler_state(scheduler) -> dict:
    """MultiStepLR's ``state_dict`` as JSON: its ``milestones`` Counter as ``[[epoch, count], ...]``, the rest (lrs,
    counters, flags) as they are; floats survive JSON exactly (shortest round-trip repr)."""
    state = dict(scheduler.state_dict())
    state["milestones"] = sorted([int(epoch), int(count)] for epoch, count in state["milestones"].items())
    return state
