"""Reading multipart uploads: each reader gets the whole file, from its first byte.

The multipart request spec lets one file fill several variables, of one operation or of
several operations of a batch (`map={"0": ["0.variables.i", "1.variables.i"]}`; Apollo's
upload client does it when one File is reused). Every variable then holds the same file object:
a second plain `read()` would start where the first stopped and get nothing."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

# One lock per upload: a rewind and its read must not interleave with another reader's (a file
# large enough to be spooled to disk is read in a thread, so the two could).
_readers: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


async def read_upload(upload: Any, limit: int) -> bytes:
    """Up to `limit` bytes of `upload` from its start (callers ask one byte more than they
    accept, to tell a file that is too large)."""
    lock = _readers.setdefault(upload, asyncio.Lock())
    async with lock:
        await upload.seek(0)
        return bytes(await upload.read(limit))
