"""One wrapper for every CRI call, unary or streaming: a log event per RPC, domain errors turned into
gRPC statuses (through ``cri.status``), unexpected exceptions logged with their traceback as INTERNAL."""

from __future__ import annotations

import asyncio
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


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary and unary-stream handler the same way."""

    def __init__(self, observe: Observer) -> None:
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        observe = self._observe
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(method, request, context, observe)
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    await call.fail(exc)
                finally:
                    call.finish()

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call = _Call(method, request, context, observe)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as exc:
                    await call.fail(exc)
                finally:
                    call.finish()

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
