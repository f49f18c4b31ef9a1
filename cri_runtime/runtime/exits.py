"""Container exits, noticed on the event loop with no polling.

Each running container's conmon is watched through a pidfd registered with the loop: the kernel
makes it readable when conmon exits, which conmon does right after writing the container's exit
file. Nothing runs while containers run. When a pidfd fires, the exit is read and recorded on a
worker thread (bounded work: one file, one DB row), and whoever awaits that container's exit is
woken. If conmon died without writing the file (killed) while the container still runs, the
container's own process is watched instead.

Callers in worker threads ask for a watch with ``watch()`` (thread-safe); coroutines await an exit
with ``wait()``, which costs no thread however long the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Executor as ThreadPool

import structlog

log = structlog.get_logger("pycri.exits")

# Reads the container's exit; records it and returns True when it has exited, or returns the pid
# of a process to watch next (its monitor is gone but the container still runs), or None when
# it is no longer known.
Check = Callable[[str], "bool | int | None"]


class ExitWatcher:
    def __init__(self, check: Check, pool: ThreadPool | None = None) -> None:
        self._check = check
        self._pool = pool
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: dict[str, int] = {}  # container ID -> pidfd registered with the loop
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._exited: set[str] = set()  # exits recorded since the last wait() for them

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        for container_id, fd in list(self._fds.items()):
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            os.close(fd)
            self._fds.pop(container_id, None)

    # --- from any thread ------------------------------------------------------------------

    def watch(self, container_id: str, pid: int | None) -> None:
        """Watch ``pid`` (the container's conmon) and record the container's exit when it ends.
        None: the monitor is already gone, look at once."""
        loop = self._loop
        if loop is None:
            return
        if _on_loop(loop):
            self._add(container_id, pid)
        else:
            loop.call_soon_threadsafe(self._add, container_id, pid)

    def exited(self, container_id: str) -> None:
        """Someone else recorded the exit (StopContainer, RemoveContainer): wake the waiters."""
        loop = self._loop
        if loop is None:
            return
        if _on_loop(loop):
            self._wake(container_id)
        else:
            loop.call_soon_threadsafe(self._wake, container_id)

    # --- on the loop ------------------------------------------------------------------------

    async def wait(self, container_id: str, timeout: float) -> bool:
        """True once the container's exit is recorded, False after ``timeout`` seconds."""
        if self._loop is None:
            raise RuntimeError("the exit watcher is not running")
        if container_id in self._exited:
            return True
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(container_id, []).append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, timeout))
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self._waiters.get(container_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(container_id, None)

    def forget(self, container_id: str) -> None:
        """The container is gone: drop its watch and its exit mark."""
        loop = self._loop
        if loop is None:
            return
        if _on_loop(loop):
            self._drop(container_id)
        else:
            loop.call_soon_threadsafe(self._drop, container_id)

    def _drop(self, container_id: str) -> None:
        self._exited.discard(container_id)
        self._unregister(container_id)

    def _add(self, container_id: str, pid: int | None) -> None:
        loop = self._loop
        if loop is None:
            return
        self._unregister(container_id)
        self._exited.discard(container_id)
        fd = None
        if pid is not None:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                fd = None  # already gone: look now
            except OSError as exc:
                log.warning("cannot watch a container's monitor", id=container_id, pid=pid, error=str(exc))
                fd = None
        if fd is None:
            self._fire(container_id)
            return
        self._fds[container_id] = fd
        loop.add_reader(fd, self._fire, container_id)

    def _unregister(self, container_id: str) -> None:
        fd = self._fds.pop(container_id, None)
        if fd is not None and self._loop is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    def _fire(self, container_id: str) -> None:
        loop = self._loop
        if loop is None:
            return
        self._unregister(container_id)
        future = loop.run_in_executor(self._pool, self._check, container_id)
        future.add_done_callback(lambda done: self._checked(container_id, done))

    def _checked(self, container_id: str, done: asyncio.Future[bool | int | None]) -> None:
        try:
            outcome = done.result()
        except Exception as exc:
            log.error("cannot read a container's exit", id=container_id, error=str(exc))
            return
        if outcome is True or outcome is None:
            self._wake(container_id)
        elif isinstance(outcome, int) and outcome > 0:
            self._add(container_id, outcome)  # the monitor is gone; watch the container itself

    def _wake(self, container_id: str) -> None:
        if self._waiters.get(container_id):
            for future in self._waiters.pop(container_id):
                if not future.done():
                    future.set_result(None)
        self._exited.add(container_id)
        self._unregister(container_id)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
