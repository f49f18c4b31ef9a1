"""Locks per pod or container ID, never one global lock held across I/O."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class _ReadWrite:
    """One key's state: readers holding it, whether a writer holds it, writers waiting."""

    __slots__ = ("changed", "readers", "users", "writer", "writers_waiting")

    def __init__(self, guard: threading.Lock) -> None:
        self.changed = threading.Condition(guard)  # this key's waiters only
        self.readers = 0
        self.writer = False
        self.writers_waiting = 0
        self.users = 0  # threads holding or waiting for this key: the entry goes at zero


class KeyedRWLocks:
    """A read/write lock per key (a pod ID), for worker threads.

    Shared holders run together; an exclusive holder runs alone. A waiting writer bars new
    readers, so that a stream of container calls cannot starve RemovePodSandbox. Keys never wait
    for each other: the one guard is held only to change a key's counters, never across the
    caller's work, and each key has its own condition.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._keys: dict[str, _ReadWrite] = {}

    def _enter(self, key: str) -> _ReadWrite:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _ReadWrite(self._guard)
        entry.users += 1
        return entry

    def _leave(self, key: str, entry: _ReadWrite) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._keys[key]
        entry.changed.notify_all()

    @contextmanager
    def shared(self, key: str) -> Iterator[None]:
        with self._guard:
            entry = self._enter(key)
            try:
                entry.changed.wait_for(lambda: not entry.writer and not entry.writers_waiting)
            except BaseException:
                self._leave(key, entry)
                raise
            entry.readers += 1
        try:
            yield
        finally:
            with self._guard:
                entry.readers -= 1
                self._leave(key, entry)

    @contextmanager
    def exclusive(self, key: str) -> Iterator[None]:
        with self._guard:
            entry = self._enter(key)
            entry.writers_waiting += 1
            try:
                entry.changed.wait_for(lambda: not entry.writer and not entry.readers)
            except BaseException:
                entry.writers_waiting -= 1
                self._leave(key, entry)
                raise
            entry.writers_waiting -= 1
            entry.writer = True
        try:
            yield
        finally:
            with self._guard:
                entry.writer = False
                self._leave(key, entry)
