"""Streaming benchmarks (issue 4): exec round trip and port-forward throughput over SPDY/3.1.

Both runtimes are driven by the same minimal SPDY client (the protocol as in
``tests/test_streaming.py``, with a buffered frame reader so 200 MB do not cost a quadratic
copy): the Exec / PortForward RPC returns a URL on the runtime's streaming server (pycri's,
or containerd's ``stream_server_address`` on 127.0.0.1), the client upgrades to SPDY/3.1 and
opens the streams kubectl would.

* **exec**: ``echo hi`` (stdout + stderr, no stdin, no TTY, ``v4.channel.k8s.io``), timed
  from the Exec RPC call until the exit status on the error stream; median of ``--exec-runs``.
* **port-forward**: one connection (error + data stream pair, headers ``port`` and
  ``requestID``) to busybox ``httpd`` in the pod serving a ``--forward-mb`` MB file of zeros;
  ``GET /big``, timed from the PortForward RPC call until the data stream's FIN, in MB/s
  (10^6 bytes). Only loopback and the pod's own network namespace are used.
"""

from __future__ import annotations

import os
import socket
import struct
import time
import urllib.parse
import zlib
from typing import Any

from bench.measure import median, read_cpu_ticks
from bench.pods import Kubelet, Pod, wait_for_log
from cri_runtime.api import api_pb2 as pb
from cri_runtime.streaming.spdy import DICTIONARY

EXEC_PROTOCOL = "v4.channel.k8s.io"
FORWARD_PROTOCOL = "portforward.k8s.io"
HTTP_PORT = 8080
RECV_SIZE = 1 << 20


def server_command(size: int) -> list[str]:
    """The streaming pod's container: a ``size``-byte file of zeros served by busybox httpd."""
    return [
        "sh",
        "-c",
        f"mkdir -p /www && head -c {size} /dev/zero > /www/big && echo ready && "
        f"exec httpd -f -p {HTTP_PORT} -h /www",
    ]


class Spdy:
    """A SPDY/3.1 client session: opens streams, sends data, reads frames through a buffer."""

    def __init__(self, url: str, protocol: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"streaming URL {url} is not on loopback")
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: Upgrade\r\n"
            f"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"{url}: connection closed during the upgrade")
            self.buf += chunk
        end = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end]
        status = int(head.split(" ", 2)[1])
        if status != 101:
            raise RuntimeError(f"{url}: upgrade answered {head.splitlines()[0]!r}")
        self.deflate = zlib.compressobj(zdict=DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.next_id = 1
        self.data: dict[int, bytearray] = {}
        self.counts: dict[int, int] = {}
        self.fin: set[int] = set()
        self.resets: set[int] = set()
        self.keep: set[int] = set()  # streams whose bytes are kept, not only counted
        self.eof = False

    def open(self, headers: dict[str, str], keep: bool = True) -> int:
        stream_id, self.next_id = self.next_id, self.next_id + 2
        block = struct.pack(">I", len(headers))
        for name, value in headers.items():
            block += (
                struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(value)) + value.encode()
            )
        compressed = self.deflate.compress(block) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        payload = struct.pack(">IIH", stream_id, 0, 0) + compressed
        self.sock.sendall(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)
        if keep:
            self.keep.add(stream_id)
        return stream_id

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        self.sock.sendall(struct.pack(">II", stream_id, (int(fin) << 24) | len(data)) + data)

    def _fill(self, need: int) -> bool:
        while len(self.buf) < need:
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                self.eof = True
                return False
            self.buf += chunk
        return True

    def read_frames(self) -> None:
        """Everything buffered plus at least one more recv, frame by frame."""
        if not self._fill(len(self.buf) + 1):
            return
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 8:
            first, flags_length = struct.unpack_from(">II", buf, pos)
            length = flags_length & 0xFFFFFF
            if len(buf) - pos - 8 < length:
                break
            start = pos + 8
            pos = start + length
            if first & 0x80000000:
                kind = first & 0xFFFF
                if kind in (1, 2, 8):  # SYN_STREAM, SYN_REPLY, HEADERS: keep the zlib context in step
                    skip = 10 if kind == 1 else 4
                    self.inflate.decompress(bytes(buf[start + skip : pos]))
                elif kind == 3:
                    self.resets.add(struct.unpack_from(">I", buf, start)[0])
                elif kind == 6:  # PING: echo it back
                    self.sock.sendall(bytes(buf[start - 8 : pos]))
                elif kind == 7:
                    self.eof = True
            else:
                self.counts[first] = self.counts.get(first, 0) + length
                if first in self.keep:
                    self.data.setdefault(first, bytearray()).extend(buf[start:pos])
                if flags_length >> 24 & 1:
                    self.fin.add(first)
        del buf[:pos]

    def read_until(self, done: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done() and not self.eof:
            if time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for the streaming server")
            self.read_frames()

    def close(self) -> None:
        self.sock.close()


def exec_once(kube: Kubelet, cid: str) -> tuple[float, bytes, bytes]:
    """One ``echo hi``: (seconds from the Exec call to the exit status, stdout, status)."""
    t0 = time.perf_counter()
    request = pb.ExecRequest(container_id=cid, cmd=["echo", "hi"], stdout=True, stderr=True)
    url = kube.client.runtime.Exec(request, timeout=10).url
    client = Spdy(url, EXEC_PROTOCOL)
    try:
        error = client.open({"streamtype": "error"})
        stdout = client.open({"streamtype": "stdout"})
        client.open({"streamtype": "stderr"})
        client.read_until(lambda: error in client.fin or error in client.resets)
        seconds = time.perf_counter() - t0
        return seconds, bytes(client.data.get(stdout, b"")), bytes(client.data.get(error, b""))
    finally:
        client.close()


def forward_once(kube: Kubelet, pod_id: str, path: str = "/big") -> tuple[float, int, bytes]:
    """One HTTP GET through PortForward: (seconds, bytes on the data stream, error stream)."""
    t0 = time.perf_counter()
    request = pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[HTTP_PORT])
    url = kube.client.runtime.PortForward(request, timeout=10).url
    client = Spdy(url, FORWARD_PROTOCOL)
    try:
        headers = {"port": str(HTTP_PORT), "requestid": "0"}
        error = client.open({"streamtype": "error", **headers})
        data = client.open({"streamtype": "data", **headers}, keep=False)
        client.send(data, f"GET {path} HTTP/1.0\r\n\r\n".encode(), fin=True)
        client.read_until(lambda: data in client.fin or data in client.resets or error in client.fin, 600)
        seconds = time.perf_counter() - t0
        return seconds, client.counts.get(data, 0), bytes(client.data.get(error, b""))
    finally:
        client.close()


def _infra_ticks(kube: Kubelet) -> int:
    return sum(read_cpu_ticks(pid) or 0 for pid in kube.runtime.infra_processes())


def streaming_phase(kube: Kubelet, exec_runs: int, forward_mb: int, forward_runs: int = 1) -> dict[str, Any]:
    size = forward_mb * 1_000_000
    pod: Pod = kube.start_pod("stream", server_command(size))
    try:
        wait_for_log(kube.log_file(pod, "c0"), b"ready", timeout=120)
        cid = pod.containers[0]
        for _ in range(3):  # warm-up, not timed
            exec_once(kube, cid)
        latencies: list[float] = []
        for _ in range(exec_runs):
            seconds, out, status = exec_once(kube, cid)
            if out != b"hi\n" or b"Success" not in status:
                raise RuntimeError(f"{kube.label}: exec echo hi gave stdout {out!r}, status {status!r}")
            latencies.append(seconds)
        # httpd listens right after "ready": a small request until it answers.
        deadline = time.monotonic() + 15
        while True:
            _, got, err = forward_once(kube, pod.pod_id, "/")
            if got and not err:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kube.label}: port-forward to httpd failed: {err!r}")
            time.sleep(0.2)
        forwards: list[dict[str, float]] = []
        for _ in range(forward_runs):
            ticks = _infra_ticks(kube)
            seconds, got, err = forward_once(kube, pod.pod_id)
            cpu = (_infra_ticks(kube) - ticks) / os.sysconf("SC_CLK_TCK")
            if got < size or err:
                raise RuntimeError(f"{kube.label}: port-forward got {got} of {size} bytes, error {err!r}")
            forwards.append(
                {
                    "seconds": seconds,
                    "bytes": got,
                    "mb_per_s": got / seconds / 1e6,
                    "runtime_cpu_percent": 100.0 * cpu / seconds,
                }
            )
    finally:
        kube.teardown(pod)
    best = max(forwards, key=lambda f: f["mb_per_s"])
    return {
        "exec_runs": exec_runs,
        "exec_median_ms": median(latencies) * 1000,
        "exec_min_ms": min(latencies) * 1000,
        "exec_max_ms": max(latencies) * 1000,
        "exec_latencies_ms": [s * 1000 for s in latencies],
        "forward_bytes": size,
        "forward_runs": forwards,
        "forward_mb_per_s": median([f["mb_per_s"] for f in forwards]),
        "forward_best_mb_per_s": best["mb_per_s"],
        # CPU of the daemon and its per-pod processes while forwarding, % of one core
        "forward_cpu_percent": median([f["runtime_cpu_percent"] for f in forwards]),
    }
