"""torchrun as the documented launch's child (``python -m vigos_megatron.training.torchrun_child ARGS``,
ARGS those of ``python -m torch.distributed.run``).

The same launch as torchrun's, with one difference: when rank 0 has already reported how the launch
ended (the record that :data:`vigos_megatron.training.launch.EXIT_RECORD_ENV` names: a complete save
after a signal, a refused resume, a corrupt checkpoint, a failed save, a stop at once), torchrun's own
report of it (its ``SignalException`` / ``ChildFailedError`` traceback and failure table, its
"failed (exitcode ...)" and "closing signal" log lines) is left out: the one line rank 0 printed says
it, and the launcher maps the exit code. Any other failure (a crash, a killed rank) keeps torchrun's
full report.
"""

from __future__ import annotations

import json
import logging
import os
import sys

#: torchrun's log lines that repeat what rank 0's record says
_REPEATS = ("failed (exitcode", "closing signal", "death signal", "shutting down workers")
_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
            "torch.distributed.elastic.agent.server.local_elastic_agent", "torch.distributed.launcher.api")


def _record() -> dict | None:
    path = os.environ.get("VIGOS_EXIT_RECORD")
    try:
        with open(path) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return None


class _OnlyWithoutRecord(logging.Filter):
    """Drop torchrun's failure lines when rank 0 wrote its record (it has said what happened)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (any(r in msg for r in _REPEATS) and _record() is not None)


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet = _OnlyWithoutRecord()
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (ChildFailedError, SignalException):
        if _record() is not None:
            return 1  # rank 0 reported the outcome; the launcher maps the exit code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
