"""What a person sees: known library warnings shown once or not at all, one progress line per step.

megatron-core and megatron-bridge log a few fixed warnings at every model build (deprecations,
the fallback from fused kernels without Apex / TE) and on every rank. Training keeps them out of
the console: each known message is shown once, on rank 0, and only when ``VIGOS_VERBOSE=1``;
everything else (real errors included) passes untouched.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: (logger or warning text fragment) of messages that are known and harmless for this project
KNOWN_MESSAGES = (
    "GPTModel IS DEPRECATED",
    "Apex is not installed",
    "Transformer Engine",
    "is deprecated",
    "torch.distributed.reduce_op",
    "TypedStorage is deprecated",
    "Converting a tensor with requires_grad=True to a scalar",
    "MimoModelConfig is experimental",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "Import of FP8GlobalStateManager",
    "absl.logging is not installed",
    "supports MoE experts",
    "No CUDA runtime is found",
    # torch.distributed.checkpoint in the one-process converters
    "torch.distributed is disabled, unavailable or uninitialized",
    "The argument order of load has been changed",
    "we are deprecating ShardedTensor",
)

#: megatron's INFO lines (every parameter of every DDP bucket, the optimizer's whole config) are not
#: for the console; its warnings and errors still show


class _OnceFilter(logging.Filter):
    def __init__(self, show: bool):
        super().__init__()
        self.show, self.seen = show, set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for known in KNOWN_MESSAGES:
            if known in msg:
                if not self.show or known in self.seen:
                    return False
                self.seen.add(known)
        return True


def quiet_known_warnings(rank: int = 0) -> None:
    """Install the filters (idempotent). Ranks other than 0 also drop library INFO lines."""
    import torch  # noqa: F401  (torch installs its loggers' handlers on import; the filter goes on them)

    show = os.environ.get("VIGOS_VERBOSE", "") == "1" and rank == 0
    flt = _OnceFilter(show)
    # loggers that exist by now (call again after importing megatron-bridge: some of its modules
    # configure their own handlers and levels)
    names = ["", "megatron", "megatron.core", "megatron.bridge", "transformers",
             "megatron.bridge.utils.import_utils"]  # logs a traceback for every absent TE symbol
    names += [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("megatron", "transformers", "torch")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OnceFilter) for f in logger.filters):
            logger.addFilter(flt)
        for handler in logger.handlers:
            handler.addFilter(flt)
    level = logging.INFO if os.environ.get("VIGOS_VERBOSE", "") == "1" and rank == 0 else logging.WARNING
    for name in names:
        if name.split(".")[0] == "megatron":
            logging.getLogger(name).setLevel(level)
    for known in KNOWN_MESSAGES:
        warnings.filterwarnings("once" if show else "ignore", message=f".*{known}.*")


def quiet_library_logs(rank: int = 0) -> None:
    """For tools and benchmarks: the platform adaptations (:func:`vigos_megatron.platform.activate`,
    which must precede megatron-bridge's import), then :func:`quiet_known_warnings` installed before
    and after megatron-bridge is imported (its modules set up their own loggers on import)."""
    from vigos_megatron import platform

    quiet_known_warnings(rank)
    platform.activate()
    import megatron.bridge  # noqa: F401

    quiet_known_warnings(rank)


def print_line(text: str) -> None:
    """``text`` and its newline in ONE write, flushed: lines of several ranks sharing a pipe never
    interleave mid-line (``print`` writes the text and the newline separately, two system calls
    when the stream is unbuffered, e.g. under ``PYTHONUNBUFFERED=1``)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_cli(main, prog: str, argv=None) -> int:
    """``main(argv)`` with the user's errors as ONE line on stderr and exit code 2; a run stopped
    on purpose (:class:`~vigos_megatron.training.signals.RunStopped`, a repeated stop signal:
    :class:`~vigos_megatron.training.signals.StopNow`) also as one line, with its documented code.

    A :class:`~vigos_megatron.errors.UserError` (bad option, path, checkpoint or data) prints
    ``prog: error: <what, naming the option or file> (hint: ...)``; ``VIGOS_VERBOSE=1`` adds the
    traceback. Any other exception propagates with its traceback (a bug, not an input problem).
    """
    import traceback

    from vigos_megatron.errors import UserError
    from vigos_megatron.training.signals import EXIT_STOPPED_UNSAVED, RunStopped, StopNow

    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun every rank fails alike: rank 0 says so
    try:
        return main(argv)
    except UserError as e:
        if rank0:
            if os.environ.get("VIGOS_VERBOSE", "") == "1":
                traceback.print_exc()
            sys.stderr.write(f"{prog}: error: {e} (hint: {e.hint}; VIGOS_VERBOSE=1 shows the traceback)\n")
            sys.stderr.flush()
        return 2
    except RunStopped as e:  # e.g. a failed save: one line, the documented code
        if rank0:
            sys.stderr.write(f"{prog}: {e}\n")
            sys.stderr.flush()
        return e.code
    except StopNow as e:
        if rank0:
            if e.saved_step is None:
                last = "during the set-up, before any step of this launch: the next launch resumes where this one did"
            elif e.saved_step:
                last = f"the last complete checkpoint is step {e.saved_step}: the next launch resumes from it"
            else:
                last = "no checkpoint was complete: the next launch starts again"
            sys.stderr.write(f"{prog}: stopped at once on a repeated {e.signal_name} before saving; {last} "
                             f"(exit code {EXIT_STOPPED_UNSAVED})\n")
            sys.stderr.flush()
        return EXIT_STOPPED_UNSAVED
