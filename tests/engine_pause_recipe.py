"""The tiny engine recipe, with places where a process waits for the test (DINO_PAUSE_DIR holds the files):

- DINO_PAUSE_STEP=N: after its N-th optimizer step (1-based) a process writes its pid to ``paused_<RANK>`` and waits
  until dino's termination handler has recorded a signal, or the file ``go`` appears;
- DINO_PAUSE_SAVE=1: in each checkpoint's weights file (the folder is still ``.tmp-step_*``) the main process writes
  its pid to ``saving`` and waits for ``go_save``.

The termination tests send their signals while the processes stand there, so the step the run stops at does not
depend on timing. Uses torch's global optimizer step hook and replaces dino.engine.checkpoint's save_weights.
"""
import os
import signal
import time
from pathlib import Path

import dino.engine.checkpoint
from engine_tiny_recipe import recipe as tiny_recipe
from torch.optim.optimizer import register_optimizer_step_post_hook


def _signal_recorded() -> bool:
    """Whether dino's termination handler (dino.engine.termination) has recorded a signal in this process."""
    handler = signal.getsignal(signal.SIGTERM)
    return bool(getattr(getattr(handler, "__self__", None), "received", 0))


def _wait_until(condition, timeout_s: float = 600) -> None:
    """Polls ``condition``; a test that never sends what it waits for fails here instead of leaving it waiting."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"engine_pause_recipe: nothing came in {timeout_s} s")
        time.sleep(0.01)


def _pause_at_step(step: int, folder: Path) -> None:
    calls = [0]

    def hook(optimizer, args, kwargs) -> None:
        calls[0] += 1
        if calls[0] == step:
            (folder / f"paused_{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
            _wait_until(lambda: _signal_recorded() or (folder / "go").exists())

    register_optimizer_step_post_hook(hook)


def _pause_in_save(folder: Path) -> None:
    save_weights = dino.engine.checkpoint.save_weights

    def paused(state, path, metadata=None):
        (folder / "saving").write_text(str(os.getpid()))
        _wait_until((folder / "go_save").exists)
        return save_weights(state, path, metadata)

    dino.engine.checkpoint.save_weights = paused


def recipe():
    folder = Path(os.environ.get("DINO_PAUSE_DIR", "."))
    if os.environ.get("DINO_PAUSE_STEP"):
        _pause_at_step(int(os.environ["DINO_PAUSE_STEP"]), folder)
    if os.environ.get("DINO_PAUSE_SAVE"):
        _pause_in_save(folder)
    return tiny_recipe()
