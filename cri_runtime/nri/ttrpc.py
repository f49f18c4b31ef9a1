"""ttrpc over NRI's connection multiplexer, on asyncio streams.

Wire format (facts from containerd/ttrpc channel.go and containerd/nri pkg/net/multiplex):

* the trunk (the unix socket) carries mux frames: uint32 BE conn id, uint32 BE payload length, payload;
  the payloads of one conn id concatenated form that logical connection's byte stream;
* conn 1 carries the plugin's service (the runtime is the ttrpc client there), conn 2 the runtime's
  service (the plugin is the client);
* each logical connection carries ttrpc messages: uint32 BE length, uint32 BE stream id, uint8 type
  (1 request, 2 response, 3 data), uint8 flags, then a ``ttrpc.Request`` / ``ttrpc.Response`` message;
  client stream ids are odd and increase.

One :class:`MuxChannel` is one side of one trunk. Anything malformed from the peer closes the trunk and
fails every pending call with :class:`TtrpcError`; it never raises into the caller's event loop otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from cri_runtime.nri.api import ttrpc_pb2

log = logging.getLogger(__name__)

PLUGIN_SERVICE_CONN = 1
RUNTIME_SERVICE_CONN = 2

MUX_HEADER = struct.Struct(">II")
MESSAGE_HEADER = struct.Struct(">IIBB")
MESSAGE_LENGTH_MAX = 4 << 20
MUX_PAYLOAD_MAX = MESSAGE_HEADER.size + MESSAGE_LENGTH_MAX
# What we send per frame: the Go side reads each frame whole into its bufio.Reader's 4 KiB buffer
# (a larger frame fails its read with ENOMEM), and its own writes come in 4 KiB pieces too.
MUX_CHUNK = 4096

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

# google.rpc codes used in responses.
CODE_OK = 0
CODE_UNKNOWN = 2
CODE_DEADLINE_EXCEEDED = 4
CODE_UNIMPLEMENTED = 12
CODE_UNAVAILABLE = 14

Handler = Callable[[str, str, bytes], Awaitable[bytes]]
"""(service, method, request payload) -> response payload; raise :class:`TtrpcError` to answer an error."""


class TtrpcError(Exception):
    """A ttrpc call failed: an error status from the peer, a timeout, or a broken connection."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid mux frame or ttrpc message."""


def mux_frames(conn_id: int, data: bytes) -> bytes:
    """Frame ``data`` for ``conn_id``, split into payloads no larger than the peer accepts."""
    out = bytearray()
    for start in range(0, max(len(data), 1), MUX_CHUNK):
        chunk = data[start : start + MUX_CHUNK]
        out += MUX_HEADER.pack(conn_id, len(chunk)) + chunk
    return bytes(out)


def ttrpc_message(stream_id: int, msg_type: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MESSAGE_LENGTH_MAX:
        raise ProtocolError(f"ttrpc message of {len(payload)} bytes exceeds {MESSAGE_LENGTH_MAX}")
    return MESSAGE_HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


@dataclass
class _Conn:
    buffer: bytearray = field(default_factory=bytearray)

    def messages(self) -> list[tuple[int, int, int, bytes]]:
        """Complete ttrpc messages buffered so far, as (stream id, type, flags, payload)."""
        out = []
        while len(self.buffer) >= MESSAGE_HEADER.size:
            length, stream_id, msg_type, flags = MESSAGE_HEADER.unpack_from(self.buffer)
            if length > MESSAGE_LENGTH_MAX:
                raise ProtocolError(f"ttrpc message length {length} exceeds {MESSAGE_LENGTH_MAX}")
            if msg_type not in (TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA):
                raise ProtocolError(f"unknown ttrpc message type {msg_type}")
            end = MESSAGE_HEADER.size + length
            if len(self.buffer) < end:
                break
            out.append((stream_id, msg_type, flags, bytes(self.buffer[MESSAGE_HEADER.size : end])))
            del self.buffer[:end]
        return out


class MuxChannel:
    """One side of an NRI trunk: serves ``serve_conn`` with ``handler``, calls the peer on ``call_conn``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        serve_conn: int,
        call_conn: int,
        handler: Handler,
        name: str = "peer",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._serve_conn = serve_conn
        self._call_conn = call_conn
        self._handler = handler
        self.name = name
        self._conns = {serve_conn: _Conn(), call_conn: _Conn()}
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._next_stream = 1
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason = ""

    @classmethod
    def runtime_side(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        name: str = "plugin",
    ) -> MuxChannel:
        return cls(
            reader,
            writer,
            serve_conn=RUNTIME_SERVICE_CONN,
            call_conn=PLUGIN_SERVICE_CONN,
            handler=handler,
            name=name,
        )

    @classmethod
    def plugin_side(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        name: str = "runtime",
    ) -> MuxChannel:
        return cls(
            reader,
            writer,
            serve_conn=PLUGIN_SERVICE_CONN,
            call_conn=RUNTIME_SERVICE_CONN,
            handler=handler,
            name=name,
        )

    def start(self) -> None:
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"nri-ttrpc-{self.name}")

    async def call(self, service: str, method: str, payload: bytes, timeout: float) -> bytes:
        """Call ``service/method`` on the peer; the response payload, or :class:`TtrpcError`."""
        if self.closed.is_set():
            raise TtrpcError(CODE_UNAVAILABLE, f"connection to {self.name} is closed: {self.close_reason}")
        stream_id = self._next_stream
        self._next_stream += 2
        request = ttrpc_pb2.Request(
            service=service, method=method, payload=payload, timeout_nano=int(timeout * 1e9)
        )
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            await self._send(
                self._call_conn, ttrpc_message(stream_id, TYPE_REQUEST, request.SerializeToString())
            )
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TtrpcError(
                CODE_DEADLINE_EXCEEDED, f"{self.name}: {method} timed out after {timeout:g}s"
            ) from None
        finally:
            self._pending.pop(stream_id, None)

    async def close(self, reason: str = "closed") -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(
                    TtrpcError(CODE_UNAVAILABLE, f"{self.name}: connection closed: {reason}")
                )
        self._pending.clear()
        current = asyncio.current_task()
        for task in [*self._tasks, self._reader_task]:
            if task is not None and task is not current:
                task.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _send(self, conn_id: int, data: bytes) -> None:
        async with self._write_lock:
            self._writer.write(mux_frames(conn_id, data))
            await self._writer.drain()

    async def _read_loop(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                header = await self._reader.readexactly(MUX_HEADER.size)
                conn_id, length = MUX_HEADER.unpack(header)
                if length > MUX_PAYLOAD_MAX:
                    raise ProtocolError(f"mux frame of {length} bytes exceeds {MUX_PAYLOAD_MAX}")
                data = await self._reader.readexactly(length)
                conn = self._conns.get(conn_id)
                if conn is None:
                    continue  # as NRI's mux: frames for a connection nobody opened are dropped
                conn.buffer += data
                for stream_id, msg_type, _flags, payload in conn.messages():
                    self._dispatch(conn_id, stream_id, msg_type, payload)
        except asyncio.IncompleteReadError:
            pass
        except (ProtocolError, DecodeError) as exc:
            reason = f"protocol error: {exc}"
            log.warning("NRI %s: %s; dropping the connection", self.name, reason)
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        await self.close(reason)

    def _dispatch(self, conn_id: int, stream_id: int, msg_type: int, payload: bytes) -> None:
        if conn_id == self._call_conn:
            if msg_type != TYPE_RESPONSE:
                raise ProtocolError(f"unexpected message type {msg_type} on the client connection")
            response = ttrpc_pb2.Response()
            response.ParseFromString(payload)
            future = self._pending.get(stream_id)
            if future is None or future.done():
                return  # a late answer to a call that timed out
            if response.status.code != CODE_OK:
                future.set_exception(TtrpcError(response.status.code, response.status.message))
            else:
                future.set_result(response.payload)
            return
        if msg_type != TYPE_REQUEST:
            raise ProtocolError(f"unexpected message type {msg_type} on the server connection")
        if stream_id % 2 == 0:
            raise ProtocolError(f"request on even stream id {stream_id}")
        request = ttrpc_pb2.Request()
        request.ParseFromString(payload)
        task = asyncio.create_task(self._serve(stream_id, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream_id: int, request: ttrpc_pb2.Request) -> None:
        response = ttrpc_pb2.Response()
        try:
            response.payload = await self._handler(request.service, request.method, request.payload)
        except TtrpcError as exc:
            response.status.code = exc.code
            response.status.message = str(exc)
        except DecodeError as exc:
            response.status.code = CODE_UNKNOWN
            response.status.message = f"malformed {request.method} request: {exc}"
        except Exception as exc:
            log.exception("NRI %s: %s/%s failed", self.name, request.service, request.method)
            response.status.code = CODE_UNKNOWN
            response.status.message = f"{request.method} failed: {exc}"
        with contextlib.suppress(ConnectionError, OSError, ProtocolError):
            await self._send(
                self._serve_conn, ttrpc_message(stream_id, TYPE_RESPONSE, response.SerializeToString())
            )
