"""One wrapper for every CRI call, unary or streaming: a log event per RPC, domain errors turned into
gRPC statuses (through ``cri.status``), unexpected exceptions logged with their traceback as INTERNAL.
Applied to the servicers' methods once, at registration (``wrap_servicer``)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from cri_runtime.cri.status import status_code
from cri_runtime.errors import PycriError

log = structlog.get_logger("pycri.rpc")

Observer = Callable[[str, str, float], None]
"""Called once per finished RPC with (method, status code name, seconds)."""


def _ids(request: Any) -> dict[str, str]:
    """IDs worth logging from a request, whatever its type."""
    out: dict[str, str] = {}
    for field in ("pod_sandbox_id", "container_id"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            out[field] = value
    image = getattr(request, "image", None)
    name = getattr(image, "image", None)
    if isinstance(name, str) and name:
        out["image"] = name
    return out


class _Call:
    """The outcome of one RPC, filled in as it ends, whichever way it ends."""

    def __init__(self, method: str, request: Any, context: grpc.aio.ServicerContext, observe: Observer):
        self.method = method
        self.request = request
        self.context = context
        self.observe = observe
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.finished = False

    async def fail(self, exc: BaseException) -> None:
        """Record ``exc`` and answer the caller with the matching status; re-raises what must propagate."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # The caller went away (a cancelled unary call, or a stream closed early).
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if not isinstance(exc, Exception):
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            # The servicer aborted with a status of its own choosing.
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
            self.message = self.context.details() or ""  # type: ignore[assignment]
            raise exc
        if isinstance(exc, PycriError):
            self.code, self.message = status_code(exc), str(exc)
        else:
            self.code = grpc.StatusCode.INTERNAL
            self.message = f"{self.method}: internal error: {exc!r}"
            log.error("rpc crashed", method=self.method, exc_info=exc)
        # Counted before the caller hears the status: a client that scrapes the metrics right after
        # its failed call sees it.
        self.finish()
        await self.context.abort(self.code, self.message)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        seconds = time.perf_counter() - self.started
        self.observe(self.method, self.code.name, seconds)
        fields = {"method": self.method, "code": self.code.name, "ms": round(seconds * 1000, 2)}
        fields.update(_ids(self.request))
        if self.code == grpc.StatusCode.OK:
            log.debug("rpc", **fields)
        else:
            log.info("rpc", error=self.message, **fields)


def _unary(inner: Callable[..., Awaitable[Any]], method: str, observe: Observer) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        rpc = _Call(method, request, context, observe)
        try:
            return await inner(request, context)
        except BaseException as exc:
            await rpc.fail(exc)
        finally:
            rpc.finish()

    return call


def _stream(inner: Callable[..., AsyncIterator[Any]], method: str, observe: Observer) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        rpc = _Call(method, request, context, observe)
        try:
            async for item in inner(request, context):
                yield item
        except BaseException as exc:
            await rpc.fail(exc)
        finally:
            rpc.finish()

    return call


class _Wrapped:
    """A servicer whose RPC methods are wrapped, once, when the generated ``add_*_to_server`` reads
    them: nothing is dispatched per call, as a gRPC interceptor would be."""

    def __init__(self, servicer: object, service: str, observe: Observer) -> None:
        self._servicer = servicer
        self._service = service
        self._observe = observe

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        full_name = f"/{self._service}/{name}"
        if inspect.isasyncgenfunction(method):
            return _stream(method, full_name, self._observe)
        if inspect.iscoroutinefunction(method):
            return _unary(method, full_name, self._observe)
        return method


def wrap_servicer(servicer: object, service: str, observe: Observer) -> Any:
    """``servicer`` with every RPC going through the one wrapper; ``service`` is the full gRPC service
    name (``runtime.v1.RuntimeService``), which the logs and metrics use as the method's prefix."""
    return _Wrapped(servicer, service, observe)
