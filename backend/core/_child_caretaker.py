"""Stops an embedded server process (Valkey) once the process that started it is gone.

`python -m backend.core._child_caretaker PARENT_PID CHILD_PID CHILD_CREATE_TIME`, started by
`EmbeddedValkey.start` in a session of its own: a process killed with SIGKILL runs no shutdown
code, and its server child would run on for good, holding its data directory. This waits until
its parent is gone (it is re-parented then), then sends the server SIGTERM (Valkey saves its
data and exits), and SIGKILL if it has not exited within STOP_TIMEOUT_S. The create time guards
against a recycled pid. A server that stops normally ends its caretaker first. Standard library
and psutil only.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 0.5
STOP_TIMEOUT_S = 30.0


def stop_child(pid: int, create_time: float) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S, to `pid` if it is still the same process."""
    try:
        child = psutil.Process(pid)
        if abs(child.create_time() - create_time) > 0.01:  # clock tick rounding
            return  # the pid now names another process
        child.terminate()
        child.wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        child.kill()
    except psutil.NoSuchProcess:
        pass


def main() -> None:
    parent, pid, create_time = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    while os.getppid() == parent:
        time.sleep(POLL_S)
    stop_child(pid, create_time)


if __name__ == "__main__":
    main()
