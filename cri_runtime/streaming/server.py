"""The streaming HTTP server that the URLs of Exec, Attach and PortForward point to.

Each RPC stores its request under a random single-use token that expires after
``TOKEN_TTL`` seconds (as kubelet's streaming library does) and returns
``http://<address>:<port>/<exec|attach|portforward>/<token>``. The client then upgrades
that HTTP request to SPDY/3.1 (``Upgrade: SPDY/3.1``, protocol chosen through
``X-Stream-Protocol-Version``) or to a WebSocket (subprotocol chosen through
``Sec-WebSocket-Protocol``). An unknown, reused or expired token gets 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any

import structlog

from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.runtime.containers import ContainerManager
from cri_runtime.runtime.sandboxes import SandboxManager
from cri_runtime.streaming import portforward, remotecommand, serving, spdy
from cri_runtime.streaming.remotecommand import StreamOptions
from cri_runtime.streaming.websocket import WebSocket, accept_key

log = structlog.get_logger("pycri.streaming")

TOKEN_TTL = 60.0
HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: list[str]
    options: StreamOptions


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    options: StreamOptions


@dataclass(frozen=True)
class PortForwardRequest:
    pod_id: str


class TokenCache:
    """Single-use tokens for pending requests, each valid for ``ttl`` seconds."""

    def __init__(self, ttl: float = TOKEN_TTL) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, str, Any]] = {}

    def put(self, kind: str, request: Any) -> str:
        now = time.monotonic()
        for token in [t for t, (expires, _, _) in self._entries.items() if expires <= now]:
            del self._entries[token]
        token = secrets.token_urlsafe(16)
        self._entries[token] = (now + self.ttl, kind, request)
        return token

    def take(self, kind: str, token: str) -> Any:
        entry = self._entries.pop(token, None)
        if entry is None or entry[0] <= time.monotonic() or entry[1] != kind:
            return None
        return entry[2]


def check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> StreamOptions:
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout and stderr must be requested")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true: a terminal has no separate stderr")
    return StreamOptions(stdin, stdout, stderr, tty)


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k == name), "")

    def header_values(self, name: str) -> list[str]:
        return [part.strip() for k, v in self.headers if k == name for part in v.split(",") if part.strip()]


async def read_request(reader: asyncio.StreamReader) -> HttpRequest:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("request header too large")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
    return HttpRequest(method, path, headers)


def _response(status: str, body: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    if status.startswith("101"):
        return ("\r\n".join(lines) + "\r\n\r\n").encode()
    data = body.encode()
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class StreamingServer:
    def __init__(
        self,
        containers: ContainerManager,
        sandboxes: SandboxManager,
        address: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.containers = containers
        self.sandboxes = sandboxes
        self.address = address
        self.port = port
        self.tokens = TokenCache()
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.address, self.port, limit=MAX_HEADER_BYTES, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("streaming server", url=self.base_url)

    async def stop(self) -> None:
        await serving.close(self._server, self._sessions)

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    # --- the RPCs' side -------------------------------------------------------------------

    def exec_url(self, container_id: str, cmd: list[str], options: StreamOptions) -> str:
        container = self._running(container_id)
        if not cmd:
            raise InvalidArgument("Exec: cmd is empty")
        token = self.tokens.put("exec", ExecRequest(container.id, list(cmd), options))
        return f"{self.base_url}/exec/{token}"

    def attach_url(self, container_id: str, options: StreamOptions) -> str:
        container = self._running(container_id)
        token = self.tokens.put("attach", AttachRequest(container.id, options))
        return f"{self.base_url}/attach/{token}"

    def portforward_url(self, pod_id: str, ports: list[int]) -> str:
        sandbox = self.sandboxes.get(pod_id)
        if sandbox.state != "ready":
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        for port in ports:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"port {port} is outside 1-65535")
        token = self.tokens.put("portforward", PortForwardRequest(sandbox.id))
        return f"{self.base_url}/portforward/{token}"

    def _running(self, container_id: str) -> Any:
        container = self.containers.get(container_id)
        if container.state != "running":
            raise FailedPrecondition(f"container {container.id} is {container.state}, not running")
        return container

    # --- HTTP -------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # one broken session must never take the server down
            log.warning("streaming session failed", error=repr(exc))
        finally:
            self._sessions.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_request(reader), HEADER_TIMEOUT)
        except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError):
            writer.write(_response("400 Bad Request", "malformed request\n"))
            return
        parts = request.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("exec", "attach", "portforward"):
            writer.write(_response("404 Not Found", "not found\n"))
            return
        kind, token = parts
        pending = self.tokens.take(kind, token)
        if pending is None:
            writer.write(_response("404 Not Found", "unknown or expired token\n"))
            return
        upgrade = request.header("upgrade").lower()
        if upgrade == "websocket":
            await self._websocket(request, reader, writer, kind, pending)
        elif upgrade == "spdy/3.1":
            await self._spdy(request, reader, writer, kind, pending)
        else:
            writer.write(_response("400 Bad Request", "expected an upgrade to SPDY/3.1 or websocket\n"))

    async def _spdy(
        self,
        request: HttpRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        kind: str,
        pending: Any,
    ) -> None:
        offered = request.header_values("x-stream-protocol-version")
        supported = (portforward.PROTOCOL,) if kind == "portforward" else remotecommand.SPDY_PROTOCOLS
        # Legacy clients that send no version speak the first protocol.
        protocol = next((p for p in offered if p in supported), "") if offered else supported[-1]
        if not protocol:
            writer.write(
                _response(
                    "403 Forbidden",
                    f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                    f"server supports {list(supported)}\n",
                )
            )
            return
        headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
        if offered:
            headers.append(("X-Stream-Protocol-Version", protocol))
        writer.write(_response("101 Switching Protocols", headers=tuple(headers)))
        await writer.drain()
        if kind == "portforward":
            sandbox = self.sandboxes.get(pending.pod_id)
            forwarder = portforward.PortForwarder(
                sandbox.id, sandbox.netns_path, lambda on_stream: spdy.Connection(reader, writer, on_stream)
            )
            await forwarder.serve()
            return
        channels_box: list[remotecommand.SpdyChannels] = []
        connection = spdy.Connection(reader, writer, lambda stream: channels_box[0].on_stream(stream))
        channels = remotecommand.SpdyChannels(pending.options, protocol, connection)
        channels_box.append(channels)
        serving = asyncio.ensure_future(connection.serve())

        def connection_ended(_: object) -> None:
            channels.gone.set()
            channels.arrived.set()

        serving.add_done_callback(connection_ended)
        try:
            if await channels.wait_streams():
                await self._run(kind, pending, channels)
            await connection.shutdown()
        finally:
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving

    async def _websocket(
        self,
        request: HttpRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        kind: str,
        pending: Any,
    ) -> None:
        key = request.header("sec-websocket-key")
        if not key:
            writer.write(_response("400 Bad Request", "missing Sec-WebSocket-Key\n"))
            return
        offered = request.header_values("sec-websocket-protocol")
        supported = (
            (portforward.WEBSOCKET_PROTOCOL,) if kind == "portforward" else remotecommand.WEBSOCKET_PROTOCOLS
        )
        protocol = next((p for p in offered if p in supported), "")
        if kind == "portforward" and not protocol:
            offered = offered or ["(none)"]
        if offered and not protocol:
            writer.write(_response("400 Bad Request", f"unsupported websocket protocols {offered}\n"))
            return
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(key)),
        ]
        if protocol:
            headers.append(("Sec-WebSocket-Protocol", protocol))
        writer.write(_response("101 Switching Protocols", headers=tuple(headers)))
        await writer.drain()
        ws = WebSocket(reader, writer)
        if kind == "portforward":
            await self._tunnelled_portforward(ws, pending)
            return
        channels = remotecommand.WebSocketChannels(pending.options, protocol or remotecommand.V1, ws)
        pump = asyncio.ensure_future(channels.pump())
        try:
            await self._run(kind, pending, channels)
            # Let the client read the close frame and answer it before the socket goes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pump), 2)
        finally:
            pump.cancel()
            await ws.close()
            ws.abort()

    async def _tunnelled_portforward(self, ws: WebSocket, pending: PortForwardRequest) -> None:
        sandbox = self.sandboxes.get(pending.pod_id)
        tunnel = asyncio.StreamReader()
        pump = asyncio.ensure_future(portforward.pump_tunnel(ws, tunnel))
        tunnel_writer: Any = portforward.TunnelWriter(ws)
        forwarder = portforward.PortForwarder(
            sandbox.id,
            sandbox.netns_path,
            lambda on_stream: spdy.Connection(tunnel, tunnel_writer, on_stream),
        )
        try:
            await forwarder.serve()
        finally:
            pump.cancel()
            await ws.close()
            ws.abort()

    async def _run(self, kind: str, pending: Any, channels: remotecommand.Channels) -> None:
        container = self.containers.find(pending.container_id)
        if container is None or container.state != "running":
            await channels.finish(None, f"container {pending.container_id} is not running")
            return
        executor = self.containers.executor(container)
        if kind == "exec":
            log.info("exec", id=container.id, cmd=pending.cmd, tty=pending.options.tty)
            await remotecommand.run_exec(channels, executor, container.id, pending.cmd)
        else:
            tty = container.config.tty
            log.info("attach", id=container.id, tty=tty)
            await remotecommand.run_attach(channels, executor, container.id, tty)
