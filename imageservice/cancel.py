"""Cancellation that reaches threads blocked in I/O.

A plain ``threading.Event`` is only seen when a thread next looks at it; a download
blocked in ``recv`` on a stalled registry would not look for a minute. Setting a
``Cancellation`` also runs the callbacks registered with it, which shut the sockets down.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable


class Cancellation(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._guard = threading.Lock()

    def on_cancel(self, callback: Callable[[], None]) -> int:
        """Run ``callback`` when cancelled (at once if already); returns a handle for ``forget``."""
        with self._guard:
            handle = self._next
            self._next += 1
            self._callbacks[handle] = callback
        if self.is_set():
            self._run(handle)
        return handle

    def forget(self, handle: int) -> None:
        with self._guard:
            self._callbacks.pop(handle, None)

    def _run(self, handle: int) -> None:
        with self._guard:
            callback = self._callbacks.pop(handle, None)
        if callback is not None:
            with contextlib.suppress(OSError):  # the socket was already gone
                callback()

    def set(self) -> None:
        super().set()
        with self._guard:
            handles = list(self._callbacks)
        for handle in handles:
            self._run(handle)


def on_cancel(event: threading.Event, callback: Callable[[], None]) -> Callable[[], None]:
    """Register ``callback`` if ``event`` supports it; returns the function that unregisters."""
    if isinstance(event, Cancellation):
        handle = event.on_cancel(callback)
        return lambda: event.forget(handle)
    return lambda: None
