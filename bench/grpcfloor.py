"""The floor under pycri's read latency: a Python gRPC (grpc.aio) server that does nothing.

``python -m bench.grpcfloor SOCKET`` serves ImageService.ImageStatus and ListImages on a unix
socket, answering empty responses at once: no lookup, no conversion, no logging, no metrics. The
concurrency section times it with the same client and call loop as the runtimes' read RPCs, so the
table shows how much of pycri's p50 is the language's gRPC stack and how much is pycri's own work.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from cri_runtime.api import api_pb2 as pb
from cri_runtime.api import api_pb2_grpc as pb_grpc


class _Empty(pb_grpc.ImageServiceServicer):
    async def ImageStatus(self, request: pb.ImageStatusRequest, context: object) -> pb.ImageStatusResponse:
        return pb.ImageStatusResponse()

    async def ListImages(self, request: pb.ListImagesRequest, context: object) -> pb.ListImagesResponse:
        return pb.ListImagesResponse()


async def _serve(socket: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ImageServiceServicer_to_server(_Empty(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


@contextmanager
def empty_server(socket: Path, timeout: float = 15.0) -> Iterator[str]:
    """Run the empty server in a process of its own (as a daemon is); yields its endpoint."""
    socket.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpcfloor", str(socket)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = proc.stdout.readline()
        if line.strip() != "ready" or time.monotonic() > deadline:
            raise RuntimeError(f"the empty gRPC server did not start (said {line!r})")
        yield f"unix://{socket}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        socket.unlink(missing_ok=True)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
