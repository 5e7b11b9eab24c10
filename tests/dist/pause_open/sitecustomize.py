"""Test support for tests/test_faults.py and tests/test_cluster.py: a pause inside a checkpoint save, so that a
test can kill or signal a run there, with no hook in the product.

``fault_common.pause_in_save`` puts this directory first on ``PYTHONPATH``, so every Python process of the
launch (the launcher, torchrun, the ranks) imports this module at start-up. With
``VIGOS_TEST_PAUSE_OPEN=GLOB=SECONDS`` set, it adds an audit hook (``sys.addaudithook``, the interpreter's
own event interface) that holds the FIRST open for writing of a path matching ``GLOB`` (``fnmatch``) in this
process: one line on stderr, ``SECONDS`` of sleep, a second line, then the open goes on. Without the
variable it does nothing.

``*/iter_0000002/.metadata*`` holds the save of step 2 in rank 0 (torch's coordinator writes ``.metadata``)
after every rank's tensors are written and before the checkpoint can be complete;
``*/iter_0000001/__0_*.distcp`` holds rank 0's writer of step 1 (with ``checkpoint.async_save``, the
forked writer: the rank trains on meanwhile).
"""

import fnmatch
import os
import sys
import time

ENV = "VIGOS_TEST_PAUSE_OPEN"


def _install(spec: str) -> None:
    glob, _, seconds = spec.rpartition("=")
    delay = float(seconds)
    held: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event != "open" or held or isinstance(args[0], int) or not args[2] & (os.O_WRONLY | os.O_RDWR):
            return
        path = os.fsdecode(os.fspath(args[0]))
        if not fnmatch.fnmatch(path, glob):
            return
        held.append(path)
        sys.stderr.write(f"[test] pausing {delay:g} s inside the save, before writing {path} "
                         f"(pid {os.getpid()}, rank {os.environ.get('RANK', '-')})\n")
        sys.stderr.flush()
        time.sleep(delay)
        sys.stderr.write(f"[test] pause over: writing {path}\n")
        sys.stderr.flush()

    sys.addaudithook(hook)


if os.environ.get(ENV):
    _install(os.environ[ENV])
