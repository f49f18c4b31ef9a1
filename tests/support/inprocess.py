"""pycri's asyncio servicers behind a synchronous ``grpc.server`` (pytest-grpc's), for in-process tests.

Each unary RPC runs the servicer's coroutine on one background event loop and waits for it. A domain
error becomes the status ``cri_runtime.cri.status`` gives it, as the daemon's interceptor
(``cri_runtime.cri.rpc``) answers; a servicer's own ``await context.abort(...)`` ends the call with its
code and message. Anything else propagates, and the sync server answers UNKNOWN: a test expecting a
proper code fails on it, as it should. Streaming RPCs are not bridged (they answer UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import grpc

from cri_runtime.api import api_pb2 as pb
from cri_runtime.cri.status import status_code
from cri_runtime.errors import PycriError

T = TypeVar("T")


class EventLoopThread:
    """One asyncio loop on its own thread, where every bridged call runs, as on the daemon's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="servicer-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _AsyncContext:
    """The sync server's context as an aio servicer uses it: ``abort`` is awaited; the rest
    (``time_remaining``, ``invocation_metadata``, ...) is the sync context's own."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise _Aborted(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _unary_methods(service: str) -> list[str]:
    methods = pb.DESCRIPTOR.services_by_name[service].methods
    return [m.name for m in methods if not (m.client_streaming or m.server_streaming)]


def sync_servicer(service: str, base: type[T], servicer: object, loop: EventLoopThread) -> T:
    """A ``base`` (``api_pb2_grpc.<service>Servicer``) whose unary RPCs run ``servicer``'s on ``loop``."""

    def bridged(name: str) -> Any:
        def call(self: object, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return loop.run(getattr(servicer, name)(request, _AsyncContext(context)))
            except _Aborted as exc:
                context.abort(exc.code, exc.details)
            except PycriError as exc:
                context.abort(status_code(exc), str(exc))

        call.__name__ = name
        return call

    cls = type(f"Sync{service}", (base,), {name: bridged(name) for name in _unary_methods(service)})
    return cls()
