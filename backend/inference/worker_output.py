"""What model loaders print goes through the log, never around it.

Loaders write to stdout and stderr: EfficientNet's "Loaded pretrained weights for ...",
transformers' and tqdm's progress bars, Python warnings. A worker process shares the server's
stderr, so that text landed between the JSON log lines, once per worker. Progress bars are turned
off (for the server and, through the environment they inherit, its workers); a worker's own
prints become log records in the server's format.

Only the standard library: the inference pool's workers import nothing else of ours.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time

# Inherited by the worker processes, which are started after the server set them.
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",  # tqdm >= 4.66 reads its defaults from TQDM_* variables
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' bars
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# The server's log format and level (`json:INFO`), handed to workers that cannot import its
# configuration; not a setting (the server writes it when it configures its logging).
WORKER_LOG_VARIABLE = "_SIGHTLINE_WORKER_LOG"
_HANDLER_NAME = "sightline-worker"


def quiet_progress_bars() -> None:
    """Turns progress bars off in this process and the processes it starts (an operator's
    explicit setting wins)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


class _JsonLines(logging.Formatter):
    """The server's JSON log line (same keys), with the standard library alone."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": "",
            "span_id": "",
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _LogWriter(io.TextIOBase):
    """A text stream whose every line is a log record (carriage-return redraws keep only
    their last state)."""

    def __init__(self, logger: logging.Logger, level: int, fallback: io.TextIOBase) -> None:
        self._logger = logger
        self._level = level
        self._fallback = fallback
        self._pending = ""
        self._inside = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._inside, "active", False):  # logging itself reporting an error
            return self._fallback.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._emit(self._pending)
        self._pending = ""

    def _emit(self, line: str) -> None:
        message = line.rsplit("\r", 1)[-1].strip()
        if not message:
            return
        self._inside.active = True
        try:
            self._logger.log(self._level, "%s", message)
        finally:
            self._inside.active = False


def log_worker_output(name: str) -> None:
    """Call first in a worker process: its log records go to stderr in the server's format,
    and what it prints becomes records of the logger `name` (stdout at INFO, stderr at
    WARNING)."""
    quiet_progress_bars()
    stream = sys.__stderr__ or sys.stderr
    root = logging.getLogger()
    if not any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler(stream)
        handler.set_name(_HANDLER_NAME)
        log_format, _, level = os.environ.get(WORKER_LOG_VARIABLE, "json:INFO").partition(":")
        if log_format == "text":
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
            )
        else:
            formatter = _JsonLines()
            formatter.converter = time.localtime
            handler.setFormatter(formatter)
        root.addHandler(handler)
        root.setLevel((level or "INFO").upper())
    logging.captureWarnings(True)
    logger = logging.getLogger(name)
    sys.stdout = _LogWriter(logger, logging.INFO, stream)  # type: ignore[assignment]
    sys.stderr = _LogWriter(logger, logging.WARNING, stream)  # type: ignore[assignment]
