"""SPDY/3.1 framing for the Kubernetes streaming protocols (server side).

Only what kubelet's clients (``moby/spdystream`` inside client-go and crictl) use: control
frames SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE, and
DATA frames. Header blocks are compressed with one zlib stream per direction for the whole
connection, primed with the SPDY/3 dictionary, and flushed (Z_SYNC_FLUSH) after each block.

Flow control: spdystream neither sends WINDOW_UPDATE nor waits for one, so pycri accepts
WINDOW_UPDATE frames and does not block its own sending on the peer's window; the receive
side is bounded instead by reading from the socket only as fast as the consumer drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

VERSION = 3
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
NOOP = 5
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
# RST_STREAM status codes.
RST_PROTOCOL_ERROR = 1
RST_INVALID_STREAM = 2
RST_REFUSED_STREAM = 3
RST_CANCEL = 5
RST_INTERNAL_ERROR = 6
RST_STREAM_IN_USE = 8
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
MAX_FRAME_LENGTH = 1 << 24
# Header blocks in this protocol are a handful of short pairs; anything larger is an attack.
MAX_HEADER_BLOCK = 64 * 1024
MAX_CONTROL_FRAME = 64 * 1024
DATA_CHUNK = 32 * 1024
# Unread bytes buffered per stream before pycri stops reading the connection.
STREAM_BUFFER_LIMIT = 1024 * 1024
MAX_STREAMS = 1024

_SPDY3_NAMES = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base content-encoding "
    "content-language content-length content-location content-md5 content-range content-type date "
    "etag expect expires from host if-match if-modified-since if-none-match if-range "
    "if-unmodified-since last-modified location max-forwards pragma proxy-authenticate "
    "proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
    "user-agent vary via warning www-authenticate method get status|200 OK|version HTTP/1.1 url "
    "public set-cookie keep-alive origin"
)
_SPDY3_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


def _dictionary() -> bytes:
    words: list[str] = []
    for part in _SPDY3_NAMES.split("|"):
        # "200 OK" contains a space; it is the one entry kept whole between bars.
        words.extend([part] if part == "200 OK" else part.split())
    return b"".join(struct.pack(">I", len(w)) + w.encode() for w in words) + _SPDY3_TAIL.encode()


# The SPDY/3 header-compression dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1).
DICTIONARY = _dictionary()
assert len(DICTIONARY) == 1423


class ProtocolError(Exception):
    """The peer broke the SPDY framing; the connection ends with GOAWAY."""


@dataclass(frozen=True)
class Frame:
    control: bool
    type: int  # control frame type, or 0 for DATA
    stream_id: int  # DATA frames only
    flags: int
    payload: bytes


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None on a clean end of stream between frames."""
    try:
        head = await reader.readexactly(8)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside a frame header") from None
    first, flags_length = struct.unpack(">II", head)
    flags, length = flags_length >> 24, flags_length & 0xFFFFFF
    control = bool(first & 0x80000000)
    if control:
        version, frame_type = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"unsupported SPDY version {version}")
        if length > MAX_CONTROL_FRAME:
            raise ProtocolError(f"control frame of {length} bytes is too large")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame") from None
    if control:
        return Frame(True, frame_type, 0, flags, payload)
    return Frame(False, 0, first & 0x7FFFFFFF, flags, payload)


def control_frame(frame_type: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(payload)) + payload


class HeaderCodec:
    """One direction's header compression state: each block continues the same zlib stream."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 9, zdict=DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)

    def encode(self, headers: list[tuple[str, str]]) -> bytes:
        raw = bytearray(struct.pack(">I", len(headers)))
        for name, value in headers:
            for text in (name.lower(), value):
                encoded = text.encode()
                raw += struct.pack(">I", len(encoded)) + encoded
        return self._deflate.compress(bytes(raw)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def decode(self, block: bytes) -> dict[str, str]:
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise ProtocolError(f"bad header block: {exc}") from None
        if self._inflate.unconsumed_tail:
            raise ProtocolError("header block too large")
        headers: dict[str, str] = {}
        try:
            (count,) = struct.unpack_from(">I", raw, 0)
            offset = 4
            for _ in range(count):
                fields = []
                for _ in range(2):
                    (size,) = struct.unpack_from(">I", raw, offset)
                    offset += 4
                    if offset + size > len(raw):
                        raise ProtocolError("header block truncated")
                    fields.append(raw[offset : offset + size].decode())
                    offset += size
                headers[fields[0].lower()] = fields[1]
        except (struct.error, UnicodeDecodeError):
            raise ProtocolError("malformed header block") from None
        return headers


class Stream:
    """One SPDY stream opened by the peer: an ordered byte pipe each way, with half-closes."""

    def __init__(self, connection: Connection, stream_id: int, headers: dict[str, str], fin: bool) -> None:
        self.connection = connection
        self.id = stream_id
        self.headers = headers
        self._buffer = bytearray()
        self._readable = asyncio.Event()
        self.remote_closed = fin
        self.local_closed = False
        self.reset = False
        if fin:
            self._readable.set()

    def _feed(self, data: bytes, fin: bool) -> None:
        if data:
            self._buffer += data
        if fin:
            self.remote_closed = True
        self._readable.set()

    def _on_reset(self) -> None:
        self.reset = self.remote_closed = self.local_closed = True
        self._readable.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def read(self, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes; b"" once the peer half-closed (FIN) or reset the stream."""
        while not self._buffer and not self.remote_closed:
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        self.connection._resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self.local_closed or self.connection.closed:
            raise ConnectionResetError(f"SPDY stream {self.id} is closed")
        view = memoryview(data)
        for start in range(0, len(view), DATA_CHUNK):
            self.connection._send(data_frame(self.id, 0, bytes(view[start : start + DATA_CHUNK])))
            await self.connection._drain()

    async def close(self) -> None:
        """Half-close our side (DATA with FIN); the peer may still send."""
        if self.local_closed or self.connection.closed:
            return
        self.local_closed = True
        self.connection._send(data_frame(self.id, FLAG_FIN, b""))
        await self.connection._drain()

    async def send_reset(self, status: int = RST_CANCEL) -> None:
        if self.reset or self.connection.closed:
            return
        self._on_reset()
        self.connection._send(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status)))
        await self.connection._drain()


class Connection:
    """The server end of a SPDY/3.1 session: accepts the peer's streams and replies to them.

    ``on_stream`` is called (synchronously) for every new stream once its SYN_REPLY is sent.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_stream: Callable[[Stream], None],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_stream = on_stream
        self.streams: dict[int, Stream] = {}
        self.closed = False
        self._codec = HeaderCodec()
        self._last_stream = 0
        self._can_read = asyncio.Event()
        self._can_read.set()
        self.finished = asyncio.Event()
        self._draining = False
        self._eof_sent = False

    def _send(self, frame: bytes) -> None:
        # writer.write never yields, so frames (and header blocks, whose compression state
        # must follow the wire order) are never interleaved.
        if not self.closed and not self._eof_sent and not self.writer.is_closing():
            self.writer.write(frame)

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            await self.close()
            raise ConnectionResetError(str(exc)) from None

    def _resume_reading(self) -> None:
        if sum(s.buffered for s in self.streams.values()) < STREAM_BUFFER_LIMIT:
            self._can_read.set()

    async def serve(self) -> None:
        """Read frames until the peer goes away or breaks the protocol."""
        try:
            while not self.closed:
                if not self._draining:
                    await self._can_read.wait()
                frame = await read_frame(self.reader)
                if frame is None:
                    break
                await self._handle(frame)
        except ProtocolError:
            self._send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_stream, GOAWAY_PROTOCOL_ERROR)))
        except (ConnectionError, OSError):
            pass
        finally:
            await self.close()

    async def _handle(self, frame: Frame) -> None:
        if not frame.control:
            if self._draining:
                return
            stream = self.streams.get(frame.stream_id)
            if stream is None or stream.remote_closed:
                if stream is None or not stream.reset:
                    self._send(
                        control_frame(RST_STREAM, 0, struct.pack(">II", frame.stream_id, RST_INVALID_STREAM))
                    )
                return
            stream._feed(frame.payload, bool(frame.flags & FLAG_FIN))
            if sum(s.buffered for s in self.streams.values()) >= STREAM_BUFFER_LIMIT:
                self._can_read.clear()
            return
        payload = frame.payload
        if frame.type == SYN_STREAM:
            if len(payload) < 10:
                raise ProtocolError("short SYN_STREAM")
            stream_id = struct.unpack_from(">I", payload, 0)[0] & 0x7FFFFFFF
            headers = self._codec.decode(payload[10:])
            if stream_id == 0 or stream_id % 2 == 0 or stream_id <= self._last_stream:
                raise ProtocolError(f"invalid stream id {stream_id}")
            self._last_stream = stream_id
            if len(self.streams) >= MAX_STREAMS:
                self._send(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, RST_REFUSED_STREAM)))
                return
            stream = Stream(self, stream_id, headers, bool(frame.flags & FLAG_FIN))
            self.streams[stream_id] = stream
            self._send(control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + self._codec.encode([])))
            self.on_stream(stream)
        elif frame.type == RST_STREAM:
            if len(payload) < 8:
                raise ProtocolError("short RST_STREAM")
            stream_id = struct.unpack_from(">I", payload, 0)[0] & 0x7FFFFFFF
            found = self.streams.get(stream_id)
            if found is not None:
                found._on_reset()
        elif frame.type == PING:
            if len(payload) != 4:
                raise ProtocolError("PING must carry 4 bytes")
            self._send(control_frame(PING, 0, payload))
        elif frame.type == GOAWAY:
            raise ConnectionResetError("peer sent GOAWAY")
        elif frame.type == HEADERS:
            if len(payload) < 4:
                raise ProtocolError("short HEADERS")
            self._codec.decode(payload[4:])  # keeps the zlib stream in step; nothing uses them
        elif frame.type in (SETTINGS, WINDOW_UPDATE, NOOP):
            pass
        elif frame.type == SYN_REPLY:
            raise ProtocolError("SYN_REPLY for a stream pycri never opened")
        else:
            raise ProtocolError(f"unknown control frame type {frame.type}")
        await self._drain()

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._resume_reading()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """End the session politely: GOAWAY, half-close, and let the peer close first.

        Closing at once with unread input would make the kernel send RST, which may destroy
        the last frames (the exit status) before the peer read them.
        """
        if self.closed:
            return
        self._send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_stream, GOAWAY_OK)))
        self._draining = True
        self._can_read.set()
        with contextlib.suppress(Exception):
            await self.writer.drain()
            if self.writer.can_write_eof():
                self._eof_sent = True
                self.writer.write_eof()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.finished.wait(), timeout)
        await self.close()

    async def close(self) -> None:
        """GOAWAY and close the socket; every stream reads end of file."""
        if self.closed:
            return
        if not self._draining:
            self._send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_stream, GOAWAY_OK)))
        self._draining = True
        self.closed = True
        for stream in self.streams.values():
            stream._on_reset()
        self._can_read.set()
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        self.finished.set()


StreamHandler = Callable[[Stream], Awaitable[None]]
