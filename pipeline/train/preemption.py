"""SIGUSR1 / SIGTERM -> finish the current step, save synchronously, exit with EXIT_PREEMPTED.

SLURM sends SIGUSR1 ahead of a time limit (`--signal=USR1@120`) and SIGTERM on preemption;
Kubernetes and Ray send SIGTERM. The handler only sets a flag: the training loop acts on it at
the next step boundary, so a signal never interrupts a save, and a second signal changes nothing.

The handler is installed by `watch_preemption()` on the first line of a training command, so a
signal that comes while the job is still importing, reading data or resuming is not lost: the
trainer sees the flag before its first step and exits with EXIT_PREEMPTED (nothing new to save).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", what a requeue wrapper looks for
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
DDP_CHECK_EVERY = 10


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name = ""
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.signal_name:
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: saving a checkpoint after this step, then exiting",
                        self.signal_name)

    def requested(self, step: int, device: torch.device, *, every: int = DDP_CHECK_EVERY) -> bool:
        """True on every rank once any rank was signalled. In DDP the ranks agree by a tiny
        all-reduce every `every` steps, not every step: it waits for the device."""
        # imported here, not at the top: the CLI installs the handler before torch loads
        import torch.distributed as dist

        from pipeline.train.distributed import any_rank

        if dist.is_available() and dist.is_initialized() and step % every:
            return False
        return any_rank(bool(self.signal_name), device)

    def restore(self) -> None:
        """Back to the default handlers (a finished run in a long-lived process, e.g. tests)."""
        global _watching
        if self.installed:
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
        if _watching is self:
            _watching = None


_watching: PreemptionFlag | None = None


def watch_preemption() -> PreemptionFlag:
    """The process's preemption flag, its handlers installed on the first call: the CLI calls it
    before anything slow, the trainer again on its first line (for launchers that call train()
    directly); both get the same flag, so a signal in between is kept."""
    global _watching
    if _watching is None:
        _watching = PreemptionFlag()
    return _watching
