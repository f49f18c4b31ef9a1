"""Exec, attach and port-forward through pycri's streaming server, driven by clients written
here against the protocols: a WebSocket client (channel.k8s.io) and a SPDY/3.1 client
(remotecommand and portforward.k8s.io), both speaking to a real daemon and real pods."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import time
import urllib.parse
import zlib
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.streaming.spdy import DICTIONARY
from tests.support.pods import Env, wait_exited
from tests.support.wait import wait_for

pytestmark = pytest.mark.root


# --- clients -----------------------------------------------------------------------------


def _connect(
    url: str, headers: list[tuple[str, str]], method: str = "GET"
) -> tuple[socket.socket, int, dict]:
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=20)
    if parts.scheme == "https":
        # The test's own self-signed certificate: encryption is what is checked here.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname=parts.hostname)
    lines = [f"{method} {parts.path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers)]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    status_line, *header_lines = head.decode().split("\r\n")
    response = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            response[name.strip().lower()] = value.strip()
    return sock, int(status_line.split()[1]), response


def _recv_exact(sock: socket.socket | WsTunnel, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class WsClient:
    def __init__(self, url: str, protocols: list[str]) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock, self.status, self.headers = _connect(
            url,
            [
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", key),
                ("Sec-WebSocket-Protocol", ", ".join(protocols)),
            ],
        )
        self.protocol = self.headers.get("sec-websocket-protocol", "")

    def send(self, payload: bytes, opcode: int = 2) -> None:
        mask = os.urandom(4)
        length = len(payload)
        head = bytes([0x80 | opcode])
        if length < 126:
            head += bytes([0x80 | length])
        elif length < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", length)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", length)
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
        self.sock.sendall(head + mask + masked)

    def send_channel(self, channel: int, data: bytes) -> None:
        if self.protocol.startswith("base64."):
            self.send(str(channel).encode() + base64.b64encode(data), opcode=1)
        else:
            self.send(bytes([channel]) + data)

    def receive_message(self) -> tuple[int, bytes] | None:
        """The next text or binary message as (opcode, payload); None once the server closed."""
        while True:
            try:
                first, second = _recv_exact(self.sock, 2)
                length = second & 0x7F
                if length == 126:
                    (length,) = struct.unpack(">H", _recv_exact(self.sock, 2))
                elif length == 127:
                    (length,) = struct.unpack(">Q", _recv_exact(self.sock, 8))
                payload = _recv_exact(self.sock, length)
            except (EOFError, OSError):
                return None
            opcode = first & 0x0F
            if opcode == 8:
                with contextlib.suppress(OSError):
                    self.send(payload[:2], opcode=8)
                return None
            if opcode in (1, 2):
                return opcode, payload

    def receive_all(self) -> dict[int, bytes]:
        """Every channel's data until the server closes."""
        out: dict[int, bytes] = {}
        while (message := self.receive_message()) is not None:
            opcode, payload = message
            if payload:
                channel, data = payload[0], payload[1:]
                if opcode == 1:
                    channel, data = channel - ord("0"), base64.b64decode(data)
                out[channel] = out.get(channel, b"") + data
        return out


class WsTunnel:
    """A socket-like view of a WebSocket whose binary messages carry one byte stream
    (SPDY tunnelled for port forwarding)."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.buffer = b""

    def sendall(self, data: bytes) -> None:
        self.ws.send(data)

    def recv(self, size: int) -> bytes:
        while not self.buffer:
            message = self.ws.receive_message()
            if message is None:
                return b""
            self.buffer += message[1]
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def close(self) -> None:
        self.ws.sock.close()


class SpdyClient:
    def __init__(
        self, url: str, protocols: list[str], method: str = "POST", tunnel: WsTunnel | None = None
    ) -> None:
        self.sock: socket.socket | WsTunnel
        if tunnel is not None:
            self.sock, self.status, self.headers = tunnel, 101, {}
        else:
            headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
            headers += [("X-Stream-Protocol-Version", p) for p in protocols]
            self.sock, self.status, self.headers = _connect(url, headers, method)
        self.deflate = zlib.compressobj(zdict=DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.next_id = 1
        self.data: dict[int, bytes] = {}
        self.fin: set[int] = set()
        self.replies: set[int] = set()
        self.resets: set[int] = set()
        self.goaway = self.eof = False

    def open(self, headers: dict[str, str]) -> int:
        stream_id, self.next_id = self.next_id, self.next_id + 2
        block = struct.pack(">I", len(headers))
        for name, value in headers.items():
            block += (
                struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(value)) + value.encode()
            )
        compressed = self.deflate.compress(block) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        payload = struct.pack(">IIH", stream_id, 0, 0) + compressed
        self.sock.sendall(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)
        return stream_id

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        self.sock.sendall(struct.pack(">II", stream_id, (int(fin) << 24) | len(data)) + data)

    def read_frame(self) -> None:
        try:
            head = _recv_exact(self.sock, 8)
        except (EOFError, OSError):
            self.eof = True
            return
        first, flags_length = struct.unpack(">II", head)
        flags, length = flags_length >> 24, flags_length & 0xFFFFFF
        payload = _recv_exact(self.sock, length)
        if first & 0x80000000:
            kind = first & 0xFFFF
            if kind == 2:
                self.replies.add(struct.unpack_from(">I", payload)[0])
                self.inflate.decompress(payload[4:])
            elif kind == 3:
                self.resets.add(struct.unpack_from(">I", payload)[0])
            elif kind == 7:
                self.goaway = True
        else:
            self.data[first] = self.data.get(first, b"") + payload
            if flags & 1:
                self.fin.add(first)

    def read_until(self, done, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
        """Read frames until ``done()``; fails if the server closes the connection first."""
        deadline = time.monotonic() + timeout
        while not done():
            assert not self.eof, f"the server closed the connection first; data: {self.data}"
            assert time.monotonic() < deadline, "timed out waiting for the server"
            self.read_frame()


def exec_url(env: Env, cid: str, cmd: list[str], **streams: bool) -> str:
    request = pb.ExecRequest(container_id=cid, cmd=cmd, **streams)
    return env.cri.runtime.Exec(request, timeout=10).url


def spdy_exec(
    env: Env, cid: str, cmd: list[str], stdin: bytes | None = None, protocol: str = "v4.channel.k8s.io"
) -> tuple[bytes, bytes, bytes]:
    url = exec_url(env, cid, cmd, stdin=stdin is not None, stdout=True, stderr=True)
    client = SpdyClient(url, [protocol])
    assert client.status == 101 and client.headers["x-stream-protocol-version"] == protocol
    error = client.open({"streamtype": "error"})
    ids = {name: client.open({"streamtype": name}) for name in ("stdout", "stderr")}
    if stdin is not None:
        ids["stdin"] = client.open({"streamtype": "stdin"})
        client.send(ids["stdin"], stdin, fin=True)
    client.read_until(lambda: error in client.fin)
    client.sock.close()
    return (
        client.data.get(ids["stdout"], b""),
        client.data.get(ids["stderr"], b""),
        client.data.get(error, b""),
    )


def daemon_fds(env: Env) -> int:
    assert env.daemon.process is not None
    return len(os.listdir(f"/proc/{env.daemon.process.pid}/fd"))


def processes_in_container(env: Env, cid: str) -> list[str]:
    """The command names of the processes running in the container, as its ps sees them."""
    return str(env.cri.exec_sync(cid, ["ps", "-o", "comm"], timeout=5).stdout.decode()).split()[1:]


def daemon_threads(env: Env) -> int:
    assert env.daemon.process is not None
    return len(os.listdir(f"/proc/{env.daemon.process.pid}/task"))


# --- tests -----------------------------------------------------------------------------------


def test_websocket_exec_separates_stdout_stderr_and_reports_the_exit_code(env: Env) -> None:
    cid = env.run(env.pod("wsexec"), "c", ["sleep", "1000"])
    cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"]
    for protocol in ("v5.channel.k8s.io", "v4.channel.k8s.io", "base64.v4.channel.k8s.io"):
        client = WsClient(exec_url(env, cid, cmd, stdout=True, stderr=True), [protocol])
        assert client.status == 101 and client.protocol == protocol
        out = client.receive_all()
        assert out.get(1) == b"out\n" and out.get(2) == b"err\n", (protocol, out)
        status = json.loads(out[3])
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    client = WsClient(exec_url(env, cid, ["true"], stdout=True), ["v5.channel.k8s.io"])
    assert json.loads(client.receive_all()[3])["status"] == "Success"


def test_websocket_exec_pipes_stdin_until_the_v5_close_signal(env: Env) -> None:
    cid = env.run(env.pod("wsstdin"), "c", ["sleep", "1000"])
    url = exec_url(env, cid, ["sh", "-c", "wc -c; echo done"], stdin=True, stdout=True)
    client = WsClient(url, ["v5.channel.k8s.io"])
    client.send_channel(0, b"x" * 70000)
    client.send(bytes([255, 0]))  # v5: close stdin
    out = client.receive_all()
    assert out[1].split() == [b"70000", b"done"]
    assert json.loads(out[3])["status"] == "Success"


def test_spdy_exec_streams_exit_code_and_stdin_eof(env: Env) -> None:
    cid = env.run(env.pod("spdyexec"), "c", ["sleep", "1000"])
    stdout, stderr, error = spdy_exec(env, cid, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (stdout, stderr) == (b"out\n", b"err\n")
    status = json.loads(error)
    assert status["reason"] == "NonZeroExitCode" and status["details"]["causes"][0]["message"] == "7"
    stdout, _, error = spdy_exec(env, cid, ["cat"], stdin=b"piped through\n", protocol="v5.channel.k8s.io")
    assert stdout == b"piped through\n" and json.loads(error)["status"] == "Success"
    # Before v4 the error stream is plain text, empty on success.
    stdout, _, error = spdy_exec(env, cid, ["sh", "-c", "echo old; exit 2"], protocol="v2.channel.k8s.io")
    assert stdout == b"old\n" and b"exit status 2" in error


def test_spdy_exec_with_a_tty_follows_resizes(env: Env) -> None:
    cid = env.run(env.pod("tty"), "c", ["sleep", "1000"])
    url = exec_url(env, cid, ["sh", "-c", "sleep 1; stty size; tty"], stdout=True, tty=True)
    client = SpdyClient(url, ["v4.channel.k8s.io"])
    error = client.open({"streamtype": "error"})
    stdout = client.open({"streamtype": "stdout"})
    resize = client.open({"streamtype": "resize"})
    client.send(resize, json.dumps({"Width": 101, "Height": 33}).encode())
    client.read_until(lambda: error in client.fin)
    lines = client.data.get(stdout, b"").decode().split("\r\n")
    assert lines != [""], client.data
    assert lines[0] == "33 101" and lines[1].startswith("/dev/pts/"), lines
    assert json.loads(client.data[error])["status"] == "Success"


def test_attach_follows_a_printing_container(env: Env) -> None:
    pod = env.pod("attach")
    cid = env.run(
        pod, "ticker", ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"]
    )
    request = pb.AttachRequest(container_id=cid, stdout=True, stderr=True)
    url = env.cri.runtime.Attach(request, timeout=10).url
    client = SpdyClient(url, ["v4.channel.k8s.io"])
    client.open({"streamtype": "error"})
    stdout = client.open({"streamtype": "stdout"})
    client.open({"streamtype": "stderr"})
    client.read_until(lambda: client.data.get(stdout, b"").count(b"\n") >= 5)
    ticks = [int(line.split()[1]) for line in client.data[stdout].decode().splitlines()[:5]]
    assert ticks == list(range(ticks[0], ticks[0] + 5))
    client.sock.close()
    # Attach over WebSocket ends with Success when the container exits.
    ws = WsClient(env.cri.runtime.Attach(request, timeout=10).url, ["v5.channel.k8s.io"])
    assert ws.receive_message() is not None
    env.cri.stop_container(cid, timeout=0)
    out = ws.receive_all()
    assert json.loads(out[3])["status"] == "Success"


def fetch_twice(client: SpdyClient) -> list[bytes]:
    """Two concurrent HTTP requests to port 8080 over one port-forward session."""
    assert client.status == 101
    pairs = []
    for request_id in ("0", "1"):
        error = client.open({"streamtype": "error", "port": "8080", "requestid": request_id})
        data = client.open({"streamtype": "data", "port": "8080", "requestid": request_id})
        pairs.append((error, data))
    for _, data in pairs:
        client.send(data, b"GET /index.html HTTP/1.0\r\n\r\n", fin=True)
    client.read_until(lambda: all(d in client.fin or e in client.fin for e, d in pairs))
    client.sock.close()
    return [client.data.get(d, b"") for _, d in pairs]


def test_port_forward_reaches_httpd_in_the_pod_with_concurrent_connections(env: Env) -> None:
    pod = env.pod("forward")
    env.run(pod, "web", ["busybox", "httpd", "-f", "-p", "8080", "-h", "/www"])
    bodies: list[bytes] = []

    def served() -> bool:  # httpd may not listen yet; each try needs a new URL
        url = env.cri.runtime.PortForward(
            pb.PortForwardRequest(pod_sandbox_id=pod, port=[8080]), timeout=10
        ).url
        bodies[:] = fetch_twice(SpdyClient(url, ["portforward.k8s.io"]))
        return all(b"hello from the pod" in body for body in bodies)

    assert wait_for(served, interval=0.2), bodies
    assert all(body.startswith(b"HTTP/1.") for body in bodies), bodies
    # The same over WebSocket: the SPDY session tunnelled in binary messages.
    url = env.cri.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod), timeout=10).url
    ws = WsClient(url, ["SPDY/3.1+portforward.k8s.io"])
    assert ws.status == 101 and ws.protocol == "SPDY/3.1+portforward.k8s.io"
    bodies = fetch_twice(SpdyClient(url, [], tunnel=WsTunnel(ws)))
    assert all(b"hello from the pod" in body for body in bodies), bodies
    # A closed port is reported on the error stream; port 0 is refused.
    url = env.cri.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod), timeout=10).url
    client = SpdyClient(url, ["portforward.k8s.io"])
    errors = []
    for request_id, port in (("0", "9"), ("1", "0")):
        error = client.open({"streamtype": "error", "port": port, "requestid": request_id})
        client.open({"streamtype": "data", "port": port, "requestid": request_id})
        errors.append(error)
    client.read_until(lambda: all(e in client.fin for e in errors))
    assert b"refused" in client.data[errors[0]].lower() and b"invalid port" in client.data[errors[1]]
    client.sock.close()


def test_rpcs_validate_and_tokens_are_single_use(env: Env) -> None:
    pod = env.pod("validate")
    cid = env.run(pod, "c", ["sleep", "1000"])

    def code(**fields: object) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as failure:
            env.cri.runtime.Exec(pb.ExecRequest(**fields), timeout=10)  # type: ignore[arg-type]
        return failure.value.code()

    assert code(container_id="0" * 64, cmd=["true"], stdout=True) == grpc.StatusCode.NOT_FOUND
    assert code(container_id=cid, cmd=["true"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        code(container_id=cid, cmd=["true"], tty=True, stdout=True, stderr=True)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    done = env.run(pod, "done", ["true"])
    wait_exited(env.cri, done)
    assert code(container_id=done, cmd=["true"], stdout=True) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as failure:
        env.cri.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id="nope"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND

    url = exec_url(env, cid, ["true"], stdout=True)
    assert WsClient(url, ["v5.channel.k8s.io"]).status == 101
    assert WsClient(url, ["v5.channel.k8s.io"]).status == 404  # reused
    base = url.rsplit("/", 1)[0]
    assert SpdyClient(f"{base}/{secrets.token_urlsafe(16)}", ["v4.channel.k8s.io"]).status == 404


def test_malformed_input_ends_only_that_session_and_leaks_nothing(env: Env) -> None:
    cid = env.run(env.pod("fuzz"), "c", ["sleep", "1000"])
    assert spdy_exec(env, cid, ["true"])[2]  # warm up: thread pool, imports
    before, threads_before = daemon_fds(env), daemon_threads(env)
    for attempt in [*range(6), *range(6)]:
        url = exec_url(env, cid, ["cat"], stdin=True, stdout=True, stderr=True)
        if attempt == 0:  # garbage instead of HTTP
            parts = urllib.parse.urlsplit(url)
            with socket.create_connection((parts.hostname, parts.port)) as sock:
                sock.sendall(b"\x00\xff garbage\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 400")
        elif attempt == 1:  # a SPDY frame with a bad header block
            client = SpdyClient(url, ["v4.channel.k8s.io"])
            client.sock.sendall(struct.pack(">HHI", 0x8003, 1, 14) + struct.pack(">IIH", 1, 0, 0) + b"junk")
            client.read_until(lambda c=client: c.goaway)
            client.sock.close()
        elif attempt == 2:  # an unknown stream type, then a stream that stops mid-frame
            client = SpdyClient(url, ["v4.channel.k8s.io"])
            client.open({"streamtype": "bogus"})
            client.sock.sendall(struct.pack(">II", 1, 1000) + b"short")
            client.sock.close()
        elif attempt == 3:  # a WebSocket client that sends unmasked frames
            ws = WsClient(url, ["v4.channel.k8s.io"])
            ws.sock.sendall(b"\x82\x05hello")
            ws.receive_all()
            ws.sock.close()
        elif attempt == 4:  # a client that goes away with the exec'd cat still reading stdin
            ws = WsClient(url, ["v4.channel.k8s.io"])
            ws.send_channel(0, b"some input")
            assert wait_for(lambda: "cat" in processes_in_container(env, cid))
            ws.sock.close()
        else:  # a client that sends nothing after the upgrade
            client = SpdyClient(url, ["v4.channel.k8s.io"])
            client.sock.close()
    stdout, _, error = spdy_exec(env, cid, ["echo", "still serving"])
    assert stdout == b"still serving\n" and json.loads(error)["status"] == "Success"
    assert wait_for(lambda: daemon_fds(env) <= before), (daemon_fds(env), before)
    # Blocking work runs in the default thread pool, which is bounded (min(32, cpus + 4)).
    assert daemon_threads(env) <= threads_before + min(32, (os.cpu_count() or 1) + 4)
    # The execs whose clients left were killed: no cat is left in the container.
    assert wait_for(lambda: "cat" not in processes_in_container(env, cid)), processes_in_container(env, cid)


def test_websocket_exec_tty_gets_the_clients_size(env: Env) -> None:
    cid = env.run(env.pod("wstty"), "c", ["sleep", "1000"])
    # The server waits a moment for the first size before it starts the command; on a loaded
    # machine the size may come later, as a resize: either way the command sees it.
    script = 'for i in $(seq 50); do s=$(stty size); [ "$s" = "22 77" ] && break; sleep 0.1; done; echo "$s"'
    url = exec_url(env, cid, ["sh", "-c", script], stdin=True, stdout=True, tty=True)
    client = WsClient(url, ["v5.channel.k8s.io"])
    client.send_channel(4, json.dumps({"Width": 77, "Height": 22}).encode())
    out = client.receive_all()
    assert out[1].strip() == b"22 77" and json.loads(out[3])["status"] == "Success"


def test_attach_to_a_tty_container_resizes_its_terminal(env: Env) -> None:
    pod = env.pod("ttyattach")
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="term"),
        image=pb.ImageSpec(image=env.image),
        command=["sh", "-c", "while true; do stty size; sleep 0.2; done"],
        tty=True,
        stdin=True,
        log_path="term.log",
    )
    cid = env.cri.create_container(pod, "term", env.image, config=config)
    env.cri.start_container(cid)
    request = pb.AttachRequest(container_id=cid, stdin=True, stdout=True, tty=True)
    client = SpdyClient(env.cri.runtime.Attach(request, timeout=10).url, ["v4.channel.k8s.io"])
    client.open({"streamtype": "error"})
    client.open({"streamtype": "stdin"})
    stdout = client.open({"streamtype": "stdout"})
    resize = client.open({"streamtype": "resize"})
    client.send(resize, json.dumps({"Width": 120, "Height": 40}).encode())
    # The container prints its terminal's size every 0.2 s: the new size shows while it runs.
    client.read_until(lambda: b"40 120" in client.data.get(stdout, b""))
    assert b"40 120" in client.data[stdout]
    assert env.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_RUNNING
    client.sock.close()


def test_tokens_are_single_use_expire_and_belong_to_one_kind() -> None:
    from cri_runtime.streaming.server import TokenCache

    tokens = TokenCache(ttl=0.2)
    token = tokens.put("exec", "request")
    assert tokens.take("attach", token) is None  # wrong kind, and now spent
    assert tokens.take("exec", token) is None
    token = tokens.put("exec", "request")
    assert tokens.take("exec", token) == "request"
    assert tokens.take("exec", token) is None
    token = tokens.put("exec", "request")
    time.sleep(0.3)  # expiry is what is checked: the token outlives its 0.2 s
    assert tokens.take("exec", token) is None


def test_spdy_header_blocks_share_one_compression_stream() -> None:
    from cri_runtime.streaming.spdy import HeaderCodec

    sender, receiver = HeaderCodec(), HeaderCodec()
    # A peer's decoder and our encoder: the deflate of one side feeds the inflate of the other.
    receiver._inflate = zlib.decompressobj(zdict=DICTIONARY)
    for headers in (
        [("streamType", "error")],
        [("streamtype", "data"), ("port", "80"), ("requestid", "1")],
        [],
    ):
        block = sender.encode(headers)
        assert receiver.decode(block) == {k.lower(): v for k, v in headers}


def _processes_running(argv: bytes) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes() == argv:
                    found.append(entry)
    return found


def test_daemon_stop_ends_open_sessions_and_their_processes(env: Env) -> None:
    cid = env.run(env.pod("shutdown"), "c", ["sleep", "1000"])
    client = WsClient(exec_url(env, cid, ["sleep", "999"], stdout=True), ["v5.channel.k8s.io"])
    assert wait_for(lambda: _processes_running(b"sleep\x00999\x00"))
    env.cri.close()
    assert env.daemon.stop() == 0
    assert client.receive_all() == {}  # the server went away without a status
    assert _processes_running(b"sleep\x00999\x00") == []
    env.daemon.start()
    env.cri = env.daemon.client()


def test_streaming_config_is_checked() -> None:
    from cri_runtime.daemon.config import config_from_dict
    from cri_runtime.errors import InvalidArgument

    config = config_from_dict({"streaming": {"address": "::1", "port": 10010}})
    assert (config.streaming.address, config.streaming.port) == ("::1", 10010)
    for bad in ({"port": 70000}, {"port": "10010"}, {"tls": True}):
        with pytest.raises(InvalidArgument):
            config_from_dict({"streaming": bad})


def test_streaming_over_tls_when_configured(daemon_factory, pod_image: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    bridge = "pyttls0"
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    daemon = daemon_factory(
        f'[network]\nconf_dir = "{net_dir}"\npod_subnet = "198.18.110.0/24"\nbridge = "{bridge}"\n'
        f'[streaming]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n',
        name="tls",
    )
    tls_env = Env(daemon, daemon.client(), pod_image, tmp_path / "logs", "198.18.110.", [])
    try:
        tls_env.cri.pull(pod_image)
        pod = tls_env.pod("tls")
        cid = tls_env.run(pod, "c", ["sleep", "100"])
        url = exec_url(tls_env, cid, ["echo", "over tls"], stdout=True, stderr=True)
        assert url.startswith("https://127.0.0.1:")
        stdout, stderr, _ = spdy_exec(tls_env, cid, ["echo", "over tls"])
        assert (stdout, stderr) == (b"over tls\n", b"")
        tls_env.cri.stop_pod(pod)
        tls_env.cri.remove_pod(pod)
    finally:
        tls_env.cri.close()
        daemon.stop()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
