"""SIGUSR1 / SIGTERM -> finish the current step, save synchronously, exit with EXIT_PREEMPTED.

SLURM sends SIGUSR1 ahead of a time limit (`--signal=USR1@120`) and SIGTERM on preemption;
Kubernetes and Ray send SIGTERM. The handler only sets a flag: the training loop acts on it at
the next step boundary, so a signal never interrupts a save, and a second signal changes nothing.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("pipeline.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", what a requeue wrapper looks for
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
DDP_CHECK_EVERY = 10


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name = ""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.signal_name:
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: saving a checkpoint after this step, then exiting",
                        self.signal_name)

    def requested(self, step: int, device: torch.device) -> bool:
        """True on every rank once any rank was signalled. In DDP the ranks agree by a tiny
        all-reduce every DDP_CHECK_EVERY steps, not every step: it waits for the device."""
        flag = bool(self.signal_name)
        if dist.is_available() and dist.is_initialized():
            if step % DDP_CHECK_EVERY:
                return False
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
