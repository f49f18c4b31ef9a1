"""Container lifecycle events for GetContainerEvents (kubelet's evented PLEG).

The managers publish from whatever thread made the change; each watcher has its own queue on
the event loop that serves its stream. A watcher that falls behind by more than ``limit``
events is cut off (its stream ends with RESOURCE_EXHAUSTED, so it reconnects and relists)
instead of making the runtime wait or grow without bound: a slow watcher never blocks a pod.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Literal

import structlog

from cri_runtime.errors import ResourceExhausted
from cri_runtime.runtime.state import Container

log = structlog.get_logger("pycri.events")

EventKind = Literal["created", "started", "stopped", "deleted"]
DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class ContainerEvent:
    kind: EventKind
    container: Container  # as it was when the event happened
    at_ns: int


class Subscription:
    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = limit
        self._queue: asyncio.Queue[ContainerEvent | None] = asyncio.Queue()
        self.dropped = False

    def _offer(self, event: ContainerEvent) -> None:
        """On the subscriber's loop: queue the event, or cut the subscriber off."""
        if self.dropped:
            return
        if self._queue.qsize() >= self._limit:
            self.dropped = True
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(event)

    async def next(self) -> ContainerEvent:
        event = await self._queue.get()
        if event is None:
            raise ResourceExhausted(
                f"container event watcher fell more than {self._limit} events behind and was "
                "disconnected; reconnect and relist"
            )
        return event


class EventHub:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscription:
        subscription = Subscription(loop, self._limit)
        with self._lock:
            self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def watchers(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    def publish(self, kind: EventKind, container: Container) -> None:
        """Tell every watcher; costs nothing when there is none. Never blocks."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        if not subscriptions:
            return
        event = ContainerEvent(kind, dataclasses.replace(container), time.time_ns())
        for subscription in subscriptions:
            try:
                subscription._loop.call_soon_threadsafe(subscription._offer, event)
            except RuntimeError:  # that loop is closed: the server is going away
                self.unsubscribe(subscription)
