"""Port forwarding over SPDY (``portforward.k8s.io``), as kubelet serves it.

The client opens two streams per forwarded connection, both carrying the headers ``port``
and ``requestID``: ``streamType: error`` and ``streamType: data``. Once both arrived pycri
dials the port on the pod's loopback inside the pod's network namespace and copies bytes
both ways; a failure is reported as text on the error stream. Any number of pairs may run
at once on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

import structlog

from cri_runtime.network.netns import enter_netns
from cri_runtime.streaming import spdy
from cri_runtime.streaming.websocket import ProtocolError as WsProtocolError
from cri_runtime.streaming.websocket import WebSocket

log = structlog.get_logger("pycri.streaming")

PROTOCOL = "portforward.k8s.io"
# Over WebSocket the SPDY session is tunnelled: its bytes travel in binary messages.
WEBSOCKET_PROTOCOL = f"SPDY/3.1+{PROTOCOL}"
DIAL_TIMEOUT = 5.0
CHUNK = 65536


def dial_in_netns(netns_path: str, port: int) -> socket.socket:
    """A connected, non-blocking socket to ``port`` on the pod's loopback (IPv4, then IPv6)."""
    with enter_netns(Path(netns_path)) if netns_path else contextlib.nullcontext():
        last: OSError | None = None
        for host in ("127.0.0.1", "::1"):
            try:
                sock = socket.create_connection((host, port), timeout=DIAL_TIMEOUT)
            except OSError as exc:
                last = exc
                continue
            sock.setblocking(False)
            return sock
        assert last is not None
        raise last


class PortForwarder:
    def __init__(
        self, pod_id: str, netns_path: str, connection_factory: Callable[..., spdy.Connection]
    ) -> None:
        self.pod_id = pod_id
        self.netns_path = netns_path
        self.connection = connection_factory(self.on_stream)
        self.pending: dict[str, dict[str, spdy.Stream]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_stream(self, stream: spdy.Stream) -> None:
        kind = stream.headers.get("streamtype", "")
        request_id = stream.headers.get("requestid", "")
        if kind not in ("data", "error") or not request_id:
            self._spawn(stream.send_reset(spdy.RST_PROTOCOL_ERROR))
            return
        pair = self.pending.setdefault(request_id, {})
        if kind in pair:
            self._spawn(stream.send_reset(spdy.RST_PROTOCOL_ERROR))
            return
        pair[kind] = stream
        if len(pair) == 2:
            del self.pending[request_id]
            self._spawn(self.forward(pair["data"], pair["error"]))

    async def serve(self) -> None:
        try:
            await self.connection.serve()
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=2)

    async def forward(self, data: spdy.Stream, error: spdy.Stream) -> None:
        text = data.headers.get("port", "")
        try:
            port = int(text)
            if not 1 <= port <= 65535:
                raise ValueError(text)
        except ValueError:
            await self._fail(data, error, f"invalid port {text!r}: must be 1-65535")
            return
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(None, dial_in_netns, self.netns_path, port)
        except Exception as exc:
            await self._fail(data, error, f"error forwarding port {port} to pod {self.pod_id}: {exc}")
            return
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError as exc:
            sock.close()
            await self._fail(data, error, f"error forwarding port {port} to pod {self.pod_id}: {exc}")
            return

        async def to_pod() -> None:
            with contextlib.suppress(OSError):
                while chunk := await data.read(CHUNK):
                    writer.write(chunk)
                    await writer.drain()
                if writer.can_write_eof() and not data.reset:
                    writer.write_eof()

        async def from_pod() -> None:
            with contextlib.suppress(OSError):
                while chunk := await reader.read(CHUNK):
                    await data.write(chunk)
                await data.close()

        pumps = [asyncio.ensure_future(to_pod()), asyncio.ensure_future(from_pod())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if not data.reset:
                await asyncio.wait(pumps)
        finally:
            for pump in pumps:
                pump.cancel()
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await error.close()
            self.connection.forget(data)
            self.connection.forget(error)

    async def _fail(self, data: spdy.Stream, error: spdy.Stream, message: str) -> None:
        log.info("port forward failed", pod=self.pod_id, error=message)
        with contextlib.suppress(ConnectionError, OSError):
            await error.write(message.encode())
            await error.close()
            await data.close()
        self.connection.forget(data)
        self.connection.forget(error)


class TunnelWriter:
    """The part of an ``asyncio.StreamWriter`` that ``spdy.Connection`` uses, over a WebSocket:
    each write becomes one binary message."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    def write(self, data: bytes) -> None:
        self.ws.send_nowait(data)

    async def drain(self) -> None:
        await self.ws.writer.drain()

    def is_closing(self) -> bool:
        return self.ws.closed or self.ws.writer.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.ws.closed = True
        self.ws.writer.close()

    async def wait_closed(self) -> None:
        await self.ws.writer.wait_closed()


async def pump_tunnel(ws: WebSocket, reader: asyncio.StreamReader) -> None:
    """Feed the tunnelled SPDY bytes from the WebSocket's binary messages to ``reader``."""
    try:
        while (message := await ws.receive()) is not None:
            reader.feed_data(message[1])
    except (WsProtocolError, ConnectionError, OSError):
        pass
    finally:
        reader.feed_eof()
