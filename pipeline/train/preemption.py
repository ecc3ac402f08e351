"""SIGUSR1 / SIGTERM / SIGINT -> finish the current step, save synchronously, exit.

SLURM sends SIGUSR1 ahead of a time limit (`--signal=USR1@120`) and SIGTERM on preemption;
Kubernetes and Ray send SIGTERM. The handler only sets a flag: the training loop acts on it at
the next step boundary, so a signal never interrupts a save, and a second SIGUSR1 or SIGTERM
changes nothing. The process exits with EXIT_PREEMPTED (75, "try again later"): slurm/common.sh
requeues on it.

Ctrl-C (SIGINT, to the whole foreground process group) is the same stop, done by a person: the
step ends, the checkpoint is saved, and the process exits with EXIT_INTERRUPTED (130 = 128 +
SIGINT, what a shell reports for Ctrl-C), which no wrapper requeues. A Ctrl-C while it is
already stopping (the second one) quits at once (one line, exit 130) without waiting for that
checkpoint: a save cut short never counts (its manifest is written last), resume=auto continues
from the newest complete one, and the next start on this host takes the run's lease over at
once. Forked children (DataLoader workers) ignore these signals: their parent decides.

The handlers are installed by `watch_preemption()` on the first line of a training command, so
a signal that comes while the job is still importing, reading data or resuming is not lost: the
trainer sees the flag before its first step and exits (nothing new to save). None of these ends
in a traceback. Only the main thread can install handlers: where train() runs in another thread
(Ray Train's workers), signals are left to the host process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", what a requeue wrapper looks for
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: a person stopped it; not requeued
SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)  # SIGUSR1 handled: all are
DDP_CHECK_EVERY = 10


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name = ""
        self.pid = os.getpid()  # forked children inherit the handler; only this process acts
        self.installed = threading.current_thread() is threading.main_thread()
        self.previous: dict[int, Any] = {}
        if self.installed:
            for sig in SIGNALS:
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # a background job of a script (`cmd &`): no Ctrl-C to handle
                self.previous[sig] = signal.signal(sig, self._handle)

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT): a person, not a scheduler."""
        return self.signal_name == "SIGINT"

    @property
    def stopped_as(self) -> str:
        return "interrupted" if self.interrupted else "preempted"

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.interrupted else EXIT_PREEMPTED

    def result(self, name: str, step: int) -> dict[str, Any]:
        """What train() returns when it stopped on a signal (`preempted`: requeue me)."""
        return {"name": name, "preempted": not self.interrupted,
                "interrupted": self.interrupted, "signal": self.signal_name, "step": step}

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self.pid:
            return
        name = signal.Signals(signum).name
        if not self.signal_name:
            self.signal_name = name
            again = ("; press Ctrl-C again to quit now without it" if signum == signal.SIGINT
                     else "")
            log.warning("%s received: saving a checkpoint after this step, then exiting%s",
                        name, again)
        elif signum == signal.SIGINT:
            log.warning("SIGINT again: quitting now without the checkpoint; resume=auto "
                        "continues from the newest complete one")
            os._exit(EXIT_INTERRUPTED)  # at once: not after a save that may take minutes

    def requested(self, step: int, device: torch.device, *, every: int = DDP_CHECK_EVERY) -> bool:
        """True on every rank once any rank was signalled. In DDP the ranks agree by a tiny
        all-reduce every `every` steps, not every step: it waits for the device."""
        # imported here, not at the top: the CLI installs the handler before torch loads
        import torch.distributed as dist

        from pipeline.distributed import any_rank

        if dist.is_available() and dist.is_initialized() and step % every:
            return False
        return any_rank(bool(self.signal_name), device)

    def restore(self) -> None:
        """Back to the handlers from before (a finished run in a long-lived process, e.g.
        tests; the CLI's own Ctrl-C handler)."""
        global _watching
        for sig, previous in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self.previous = {}
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
