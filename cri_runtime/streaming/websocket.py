"""RFC 6455 WebSocket, server side, as the Kubernetes channel protocols use it.

Clients mask their frames; the server never does. Control frames (ping, pong, close) may
arrive between the fragments of a message; pings are answered with pongs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
MAX_MESSAGE = 16 * 1024 * 1024


class ProtocolError(Exception):
    """The peer broke the WebSocket framing."""


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


class WebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    async def receive(self) -> tuple[int, bytes] | None:
        """The next data message as (opcode, payload); None once the peer closed."""
        opcode_of_message = 0
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                head = await self.reader.readexactly(2)
                fin, opcode = head[0] & 0x80, head[0] & 0x0F
                if head[0] & 0x70:
                    raise ProtocolError("reserved bits set")
                masked, length = head[1] & 0x80, head[1] & 0x7F
                if not masked:
                    raise ProtocolError("client frames must be masked")
                if length == 126:
                    (length,) = struct.unpack(">H", await self.reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack(">Q", await self.reader.readexactly(8))
                if opcode >= 0x8 and (length > 125 or not fin):
                    raise ProtocolError("bad control frame")
                if size + length > MAX_MESSAGE:
                    raise ProtocolError("message too large")
                mask = await self.reader.readexactly(4)
                payload = _unmask(await self.reader.readexactly(length), mask)
            except asyncio.IncompleteReadError:
                self.closed = True
                return None
            if opcode == OP_CLOSE:
                await self.close(CLOSE_NORMAL)
                return None
            if opcode == OP_PING:
                await self._send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CONTINUATION:
                if not opcode_of_message:
                    raise ProtocolError("continuation without a message")
            elif opcode in (OP_TEXT, OP_BINARY):
                if opcode_of_message:
                    raise ProtocolError("new message inside a fragmented one")
                opcode_of_message = opcode
            else:
                raise ProtocolError(f"unknown opcode {opcode}")
            parts.append(payload)
            size += length
            if fin:
                return opcode_of_message, b"".join(parts)

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("websocket closed")
        length = len(payload)
        if length < 126:
            head = struct.pack(">BB", 0x80 | opcode, length)
        elif length < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 126, length)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, length)
        self.writer.write(head + payload)
        await self.writer.drain()

    def send_nowait(self, payload: bytes) -> None:
        """Queue one binary message without waiting (the transport buffers it)."""
        if self.closed:
            raise ConnectionResetError("websocket closed")
        length = len(payload)
        if length < 126:
            head = struct.pack(">BB", 0x80 | OP_BINARY, length)
        elif length < 65536:
            head = struct.pack(">BBH", 0x80 | OP_BINARY, 126, length)
        else:
            head = struct.pack(">BBQ", 0x80 | OP_BINARY, 127, length)
        self.writer.write(head + payload)

    async def send(self, payload: bytes, *, text: bool = False) -> None:
        await self._send_frame(OP_TEXT if text else OP_BINARY, payload)

    async def close(self, code: int = CLOSE_NORMAL) -> None:
        """Send the close frame; the socket stays open so the peer's close frame can be read
        (closing with unread input would reset the connection and lose what we sent last)."""
        if self.closed:
            return
        with contextlib.suppress(Exception):
            await self._send_frame(OP_CLOSE, struct.pack(">H", code))
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()


def _unmask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return data
    # XOR as one big integer: far faster than a Python loop over bytes.
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(len(data), "little")
