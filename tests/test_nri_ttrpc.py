"""ttrpc over NRI's mux: both directions on one real unix socket pair, and a hostile peer.

Both ends here are this module's own code, so the wire format is checked against upstream's
constants (header sizes, conn ids, odd stream ids) by reading raw bytes, not only by round trips.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from cri_runtime.nri import ttrpc
from cri_runtime.nri.api import ttrpc_pb2

Pair = tuple[ttrpc.MuxChannel, ttrpc.MuxChannel]


async def _echo(service: str, method: str, payload: bytes) -> bytes:
    if method == "Fail":
        raise ttrpc.TtrpcError(ttrpc.CODE_UNIMPLEMENTED, "no such method")
    if method == "Slow":
        await asyncio.sleep(5)
    return f"{service}/{method}:".encode() + payload


async def _pair() -> Pair:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ra, wa = await asyncio.open_unix_connection(sock=a)
    rb, wb = await asyncio.open_unix_connection(sock=b)
    runtime = ttrpc.MuxChannel.runtime_side(ra, wa, _echo)
    plugin = ttrpc.MuxChannel.plugin_side(rb, wb, _echo)
    runtime.start()
    plugin.start()
    return runtime, plugin


def test_calls_in_both_directions_and_error_status() -> None:
    async def main() -> None:
        runtime, plugin = await _pair()
        assert await runtime.call("svc.Plugin", "Configure", b"x", 2) == b"svc.Plugin/Configure:x"
        assert await plugin.call("svc.Runtime", "RegisterPlugin", b"y", 2) == b"svc.Runtime/RegisterPlugin:y"
        big = b"b" * (5 << 20)  # over ttrpc's 4 MiB message limit: refused before sending
        with pytest.raises(ttrpc.ProtocolError):
            await runtime.call("svc", "Big", big, 2)
        payload = b"z" * (3 << 20)
        assert await runtime.call("svc", "Large", payload, 5) == b"svc/Large:" + payload
        with pytest.raises(ttrpc.TtrpcError) as err:
            await runtime.call("svc", "Fail", b"", 2)
        assert err.value.code == ttrpc.CODE_UNIMPLEMENTED and "no such method" in str(err.value)
        await runtime.close()
        await plugin.close()

    asyncio.run(main())


def test_timeout_then_late_answer_is_ignored() -> None:
    async def main() -> None:
        runtime, plugin = await _pair()
        with pytest.raises(ttrpc.TtrpcError) as err:
            await runtime.call("svc", "Slow", b"", 0.2)
        assert err.value.code == ttrpc.CODE_DEADLINE_EXCEEDED
        assert await runtime.call("svc", "Quick", b"", 2) == b"svc/Quick:"
        await runtime.close()
        await plugin.close()

    asyncio.run(main())


def test_wire_format_is_mux_then_ttrpc_header() -> None:
    async def main() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ra, wa = await asyncio.open_unix_connection(sock=a)
        rb, _wb = await asyncio.open_unix_connection(sock=b)
        runtime = ttrpc.MuxChannel.runtime_side(ra, wa, _echo)
        runtime.start()
        call = asyncio.create_task(runtime.call("nri.pkg.api.v1alpha1.Plugin", "Configure", b"cfg", 1))
        conn_id, length = struct.unpack(">II", await rb.readexactly(8))
        size, stream, kind, flags = struct.unpack(">IIBB", await rb.readexactly(10))
        request = ttrpc_pb2.Request.FromString(await rb.readexactly(size))
        assert (conn_id, length, stream, kind, flags) == (1, 10 + size, 1, 1, 0)
        assert max(len(f) - 8 for f in _frames(ttrpc.mux_frames(1, b"x" * 10000))) == 4096
        assert (request.service, request.method, request.payload) == (
            "nri.pkg.api.v1alpha1.Plugin",
            "Configure",
            b"cfg",
        )
        assert request.timeout_nano == 1_000_000_000
        call.cancel()
        await runtime.close()

    asyncio.run(main())


def _frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        (length,) = struct.unpack(">I", data[4:8])
        out.append(data[: 8 + length])
        data = data[8 + length :]
    return out


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">II", 2, 10) + struct.pack(">IIBB", 0, 1, 9, 0),  # unknown message type
        struct.pack(">II", 2, 10) + struct.pack(">IIBB", 64 << 20, 1, 1, 0),  # oversized message
        struct.pack(">II", 2, 13) + struct.pack(">IIBB", 3, 1, 1, 0) + b"\xff\xff\xff",  # not a Request
        struct.pack(">II", 1, 64 << 20),  # oversized mux frame
    ],
    ids=["type", "length", "protobuf", "frame"],
)
def test_malformed_input_drops_the_connection_and_fails_pending_calls(garbage: bytes) -> None:
    async def main() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ra, wa = await asyncio.open_unix_connection(sock=a)
        rb, wb = await asyncio.open_unix_connection(sock=b)
        runtime = ttrpc.MuxChannel.runtime_side(ra, wa, _echo)
        runtime.start()
        pending = asyncio.create_task(runtime.call("svc", "Configure", b"", 5))
        await rb.readexactly(8)  # the request's mux header: it went out
        wb.write(garbage)
        await wb.drain()
        await asyncio.wait_for(runtime.closed.wait(), 2)
        assert "protocol error" in runtime.close_reason
        with pytest.raises(ttrpc.TtrpcError) as err:
            await pending
        assert err.value.code == ttrpc.CODE_UNAVAILABLE
        assert await rb.read() is not None  # our end was closed: EOF reaches the peer
        wb.close()

    asyncio.run(main())
