"""A termination signal ends a training run with a checkpoint: the step in progress finishes, every process saves at
the same step, and the run exits with one line and :data:`TERMINATED_EXIT_CODE`.

Clusters end jobs with a signal and a grace period before SIGKILL: Slurm and Kubernetes send SIGTERM, and Slurm's
``--signal`` can send another (SIGUSR1 in recipes/slurm_multinode.sh) ahead of the time limit. The signals caught are
``train.termination_signals``; SIGINT (Ctrl-C) is not among them by default and stays an immediate interruption.

The processes agree on the step without a collective of their own: the all-reduce that already runs before each
micro-batch (could every process load it? see :func:`dino.engine.bad_images.agreed_batches`) carries a second
number, the signal this process received. Its maximum over the processes is the same everywhere, so a signal that
reached one process only (SIGTERM to one rank) stops all of them before the same micro-batch. A signal that arrives
while a step runs is seen at the next micro-batch fetch, after that step's optimizer update; the run never stops
inside an accumulation group.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
from dataclasses import asdict
from functools import partial
from types import FrameType
from typing import Callable, Iterable, NoReturn

import torch
import torch.distributed as dist

from dino.errors import UserError

logger = logging.getLogger("dino.engine")

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": distinct from 0 (finished), 1 (a bug),
# 2 (a user error), 130 (Ctrl-C) and 143 (killed by SIGTERM without saving).
TERMINATED_EXIT_CODE = 75
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


class Terminated(Exception):
    """Raised on every process once the termination checkpoint is saved; the message is the one line to print."""

    def __init__(self, signal_name: str, step: int, checkpoint) -> None:
        super().__init__(f"terminated by {signal_name} at step {step}; saved {checkpoint}; "
                         "rerun the same command to resume")


def termination_signals(names: Iterable[str]) -> tuple[signal.Signals, ...]:
    """The signals named in ``train.termination_signals``; UserError for a name that is not a catchable signal."""
    found = []
    for name in names:
        sig = getattr(signal.Signals, name, None) if name.startswith("SIG") else None
        if sig is None or name in _UNCATCHABLE:
            raise UserError(f"train.termination_signals: {name!r} is not a signal that can be caught "
                            "(e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGHUP, SIGINT)")
        found.append(sig)
    return tuple(found)


def data_worker_init(names: Iterable[str]) -> Callable[[int], None]:
    """The DataLoaders' ``worker_init_fn`` for ``train.termination_signals``: a data worker drops those signals unless
    its main process sends them. torchrun passes a signal on to each process's whole process group, data workers
    included, and Slurm signals every process of a job; a worker ended by it fails the main process's next fetch
    ("DataLoader worker is killed by signal") before the checkpoint. The main process itself ends its workers with
    SIGTERM (the DataLoader's shutdown, multiprocessing at exit), and that must still end them
    (:func:`_drop_others_signals`).

    Where the worker cannot tell the senders apart (no ``sigwaitinfo``) it ignores them all, and would then outlive
    multiprocessing's own exit hook, which sends SIGTERM and waits for its daemonic children without a timeout. There
    only, this also registers, once, an exit hook of the main process that kills its daemonic children first
    (:func:`_kill_daemonic_children`)."""
    global _exit_hook_registered
    if not hasattr(signal, "sigwaitinfo") and not _exit_hook_registered:
        atexit.register(_kill_daemonic_children)  # after multiprocessing registered its hook, so it runs before it
        _exit_hook_registered = True
    return partial(_drop_others_signals, tuple(termination_signals(names)))


_exit_hook_registered = False


def _drop_others_signals(signals: tuple[signal.Signals, ...], worker_id: int) -> None:
    """In the worker: the signals are blocked and a thread takes them; one sent by the main process (the DataLoader
    ending its workers, multiprocessing at exit) ends the worker at once, as torch's own SIGTERM handler does, and one
    from anyone else (torchrun, Slurm) is dropped. Where ``sigwaitinfo`` is missing (macOS) they are ignored."""
    if not hasattr(signal, "sigwaitinfo"):
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # a fork child has one thread; later ones inherit the mask
    threading.Thread(target=_take_signals, args=(set(signals), os.getppid()), name="dino-worker-signals",
                     daemon=True).start()


def _take_signals(signals: set[signal.Signals], parent: int) -> None:
    while True:
        if signal.sigwaitinfo(signals).si_pid == parent:
            os._exit(0)


def _kill_daemonic_children() -> None:
    """SIGKILLs this process's live daemonic children (the data workers) and waits for them."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children and hasattr(signal, "SIGCHLD"):
        # DataLoader's SIGCHLD handler raises for a worker killed by a signal; at exit that is the point.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(10)


class TerminationSignals:
    """While entered, the signals of ``train.termination_signals`` are recorded instead of ending the process.

    ``received``: the first signal this process got (0: none); later ones, a second SIGTERM during the save
    included, are ignored so that nothing interrupts the checkpoint. ``agreed``: the signal every process stops
    on (0: none), set by :func:`agree`. Handlers can only be installed from the main thread; elsewhere (a library
    caller's thread) the signals keep their handlers and nothing is recorded.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.signals = termination_signals(names)
        self.received = 0
        self.agreed = 0
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "TerminationSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            return
        self.received = signum
        # Runs in the main thread between bytecodes; logging's lock is re-entrant, so this cannot deadlock.
        logger.warning("got %s: stopping after the current optimizer step, with a checkpoint",
                       signal.Signals(signum).name)

    def stop(self, checkpointer, progress) -> NoReturn:
        """Saves a checkpoint of ``progress`` on every process (unless the last one saved holds exactly this state,
        e.g. the epoch-end checkpoint just written) and raises :class:`Terminated`."""
        last = checkpointer.last_saved
        path = last[1] if last is not None and last[0] == asdict(progress) else checkpointer.save(progress, False)
        raise Terminated(signal.Signals(self.agreed).name, progress.global_step, path)


def agree(accelerator, failed: bool, termination: TerminationSignals | None) -> bool:
    """Whether any process ``failed``; also sets ``termination.agreed`` to the signal any process received.

    One all-reduce (max) of two numbers over the processes, the only collective of a micro-batch fetch.
    """
    local = [1.0 if failed else 0.0, float(termination.received if termination is not None else 0)]
    if accelerator.num_processes > 1:
        values = torch.tensor(local, device=accelerator.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        local = values.tolist()
    if termination is not None and local[1]:
        termination.agreed = int(local[1])
    return local[0] > 0
