"""Graceful stop on SIGTERM / SIGINT: finish the current step, save a checkpoint, exit 0.

``with StopSignal() as stop:`` installs handlers for SIGTERM and SIGINT. The first signal only sets
a flag (one message on stderr); the training loop polls it once per step through the collective
:meth:`StopSignal.agreed`, so that every rank stops after the same step even when the signal reached
only some of them, and then saves. The training loop holds the handlers for the whole launch: from
the set-up (a signal while the models are built stops the launch after its first step) to the end of
the final save.

Duplicates: one stop often reaches a rank several times within milliseconds: Slurm signals every
process of the job step, and torchrun (and the launcher, ``vigos_megatron.training.launch``)
forward the signal they received to their workers. Repeats of a handled signal within
:data:`DUPLICATE_WINDOW_S` of the first one are the same stop and are ignored. Arrival times are
taken when the signal arrives (``signal.set_wakeup_fd`` and a thread reading it), not when Python
gets round to running the handler, which can be seconds later inside a long collective.

A signal after that window means "stop at once": :class:`StopNow` is raised in the main thread,
wherever it is (a save in progress is abandoned: its directory has no manifest, and the next
launch moves it aside and resumes from the last complete checkpoint). The entry point exits
:data:`EXIT_STOPPED_UNSAVED` then.

Exit codes of the documented launch (``examples/pretrain_vigos.py``; ``launch`` maps torchrun's):

====  ======================================================================================
0     the run reached ``train.steps`` / ``train.exit_after``, or stopped on a signal after a
      complete checkpoint (the same command resumes)
1     a failure: a crash, a killed rank, a save that failed (e.g. a full disk)
2     the user's input: an option, a path, a resume refused (settings changed), no complete
      checkpoint left to resume from (``checkpoint.on_corrupt``)
75    stopped on a signal before a checkpoint of the last steps was complete (a second signal,
      or the ranks were stopped by the launcher): the next launch resumes from the last
      complete checkpoint and repeats the steps after it (``EX_TEMPFAIL``: try again)
====  ======================================================================================

Preemption: Slurm sends SIGTERM and kills after ``KillWait`` seconds (``sbatch --signal=TERM@120``
gives earlier notice); the loop must reach the end of its step and save within that time.
"""

from __future__ import annotations

import _thread
import os
import select
import signal
import sys
import threading
import time

import torch

HANDLED = (signal.SIGTERM, signal.SIGINT)
#: repeats of a signal within this many seconds of the first are the same stop (see the module docstring)
DUPLICATE_WINDOW_S = 2.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED_UNSAVED = 75


class StopNow(BaseException):
    """A repeated stop signal: leave at once (raised in the main thread; not an ``Exception``, so that
    no ``except Exception`` on the way swallows it)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        #: the step of the last complete checkpoint (set by the training loop on the way out)
        self.saved_step: int | None = None


class RunStopped(Exception):
    """The run stops with ``code`` and one line saying why (e.g. a save failed: code 1)."""

    def __init__(self, line: str, code: int = EXIT_FAILED):
        super().__init__(line)
        self.code = code


class StopSignal:
    """Context manager: the first SIGTERM/SIGINT sets :attr:`requested` (see the module docstring)."""

    def __init__(self, signals=HANDLED, *, window_s: float = DUPLICATE_WINDOW_S, stream=None):
        self.signals = tuple(signals)
        self.window_s = window_s
        self.stream = stream
        self._previous: dict[int, object] = {}
        self._received: int | None = None
        self._first_at = 0.0
        self._repeats = 0
        self._stop_now: int | None = None
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ context

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal must be entered in the main thread (Python delivers signals there)")
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._pipe = (r, w)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._read_arrivals, name="vigos-stop-signal", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            r, w = self._pipe
            os.close(w)  # the reader sees end-of-file and returns
            if self._thread is not None:
                self._thread.join(timeout=5)
            os.close(r)
            self._pipe = None
        return False

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def _read_arrivals(self) -> None:
        r = self._pipe[0]
        while True:
            try:
                select.select([r], [], [])
                data = os.read(r, 512)
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                return
            if not data:
                return
            now = time.monotonic()
            for signum in data:
                if signum in self.signals:
                    self._arrived(signum, now)

    def _arrived(self, signum: int, now: float) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            if self._received is None:
                self._received, self._first_at = signum, now
                self._say(f"[vigos] received {name}: stopping after the current step (a checkpoint is saved); "
                          f"send it again after {self.window_s:g} s to stop at once")
                return
            if now - self._first_at <= self.window_s:
                self._repeats += 1
                if self._repeats == 1:
                    self._say(f"[vigos] {name} again within {self.window_s:g} s: the same stop (a launcher, torchrun "
                              "or the scheduler passing the signal on), ignored")
                return
            if self._stop_now is not None:
                return
            self._stop_now = signum
        _thread.interrupt_main(signum)  # runs _handle in the main thread, which raises StopNow

    def _handle(self, signum, frame):
        # the C-level handler has written the signal to the wakeup pipe; the reader thread decides
        if self._stop_now is not None:
            name = signal.Signals(self._stop_now).name
            self._say(f"[vigos] {name} again: stopping at once (no checkpoint of the steps since the last one)")
            raise StopNow(name)

    # ------------------------------------------------------------------ queries

    @property
    def requested(self) -> bool:
        """True once this process received a handled signal."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self._received).name if self._received is not None else None

    def wait_noticed(self, timeout: float = 1.0) -> bool:
        """Wait up to ``timeout`` for the reader thread to note a signal that already arrived (tests)."""
        end = time.monotonic() + timeout
        while not self.requested and time.monotonic() < end:
            time.sleep(0.005)
        return self.requested

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
