"""Worker processes that die with the process that started them.

A server killed with SIGKILL runs no shutdown code, so its workers must notice by themselves:
on Linux the kernel sends them SIGKILL when their parent goes (PR_SET_PDEATHSIG), and on every
platform a watchdog thread ends them once their parent process has changed (they were
re-parented). The pipe alone is not enough: a process pool's worker holds both ends of its
queues, so it never reads end-of-file.

Only the standard library: the inference pool and the embedding worker both use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def die_with_parent(parent_pid: int, poll_s: float = POLL_S) -> None:
    """Call first in a worker process, with the pid of the process that started it.

    The death signal fires when the *thread* that started the worker ends: workers here are
    started from the event loop's thread, which outlives the pools it owns (they are closed on
    it). The watchdog covers every other case (and other platforms) within `poll_s`."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # gone before the signal was armed
        os._exit(1)
    threading.Thread(
        target=_watch, args=(parent_pid, poll_s), name="sightline-lifeline", daemon=True
    ).start()


def _watch(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup: the parent that would want it is gone


def worker_pool(initializer: Callable[..., None], *initargs: Any) -> ProcessPoolExecutor:
    """One spawned worker process (never forked from a server with threads) whose initializer
    gets `initargs` and then this process's pid, for `die_with_parent`."""
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=initializer,
        initargs=(*initargs, os.getpid()),
    )
