"""Graceful stop on SIGTERM / SIGINT: finish the current step, save a checkpoint, exit 0.

``with StopSignal() as stop:`` installs handlers that only set a flag on the first signal (a
message goes to stderr); the training loop polls it once per step through the collective
:meth:`StopSignal.agreed`, so that every rank stops after the same step even when the signal
reached only some of them, and then saves. A second signal restores the handler that was
installed before and delivers the signal to it again (SIGINT: ``KeyboardInterrupt``; SIGTERM:
the default action, termination), for a user who does not want to wait.

Preemption: Slurm sends SIGTERM and kills after ``KillWait`` seconds (``sbatch --signal=TERM@120``
gives earlier notice); torchrun forwards a SIGTERM it receives to its workers and kills them
after its own grace period. The loop must reach the end of its step and save within that time.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Context manager: the first SIGTERM/SIGINT sets :attr:`requested` (see the module docstring)."""

    def __init__(self, signals=HANDLED):
        self.signals = tuple(signals)
        self._previous: dict[int, object] = {}
        self._received: int | None = None

    # ------------------------------------------------------------------ context

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal must be entered in the main thread (Python delivers signals there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self._received is None:
            self._received = signum
            print(f"[vigos] received {signal.Signals(signum).name}: stopping after the current step "
                  "(a checkpoint is saved); send it again to stop at once", file=sys.stderr, flush=True)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
        # SIG_IGN: the signal was ignored before; keep ignoring it

    # ------------------------------------------------------------------ queries

    @property
    def requested(self) -> bool:
        """True once this process received a handled signal."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self._received).name if self._received is not None else None

    def agreed(self, group=None) -> bool:
        """Collective over ``group`` (default: the world): True when ANY rank received a signal.

        Every rank of ``group`` must call it at the same point (once per step). The flag is
        all-reduced (MAX) on the backend's device (CUDA for NCCL, CPU for gloo).
        """
        import torch.distributed as dist

        if not dist.is_initialized():
            return self.requested
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
