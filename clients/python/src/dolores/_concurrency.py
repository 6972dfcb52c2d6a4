"""What the blocking and the asyncio client do differently, besides ``await``: the
stop flag a listener sleeps on between reconnects, and calling the caller's token
function. Each comes as a pair, ``AsyncX`` / ``X`` (``acall_token`` / ``call_token``),
so that ``scripts/unasync.py`` turns one client into the other by renaming alone."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable, Optional

__all__ = ["AsyncStop", "Stop", "acall_token", "call_token"]


class AsyncStop:
    """A listener's stop flag for asyncio: ``set()`` ends a ``wait()`` at once.

    The same three methods as ``threading.Event`` (``Stop``): ``set``, ``is_set`` and
    ``wait(timeout)``, which answers whether the flag is set."""

    def __init__(self) -> None:
        self._set = False
        self._wake: Optional[asyncio.Event] = None

    def set(self) -> None:
        self._set = True
        if self._wake is not None:
            self._wake.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float) -> bool:
        if self._set:
            return True
        # Made here, in the running loop: before Python 3.10 an asyncio.Event belongs to
        # the loop current when it is made, and a listener may be made outside any.
        self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self._set


class Stop(threading.Event):
    """A listener's stop flag for the blocking client: a ``threading.Event``, so
    ``close()`` from another thread ends a ``wait()`` at once."""


async def acall_token(source: Callable[[str], Any], uid: str) -> Any:
    """``source(uid)``, awaited when it is a coroutine function."""
    token = source(uid)
    return await token if inspect.isawaitable(token) else token


def call_token(source: Callable[[str], Any], uid: str) -> Any:
    """``source(uid)``."""
    return source(uid)
