"""Exec and attach sessions: the Kubernetes remotecommand protocol over SPDY or WebSocket.

Protocol facts (k8s.io/apimachinery/pkg/util/remotecommand, kubelet's cri/streaming):
- SPDY: the client opens one stream per channel, named by the ``streamType`` header
  (``error``, ``stdin``, ``stdout``, ``stderr``, ``resize``); stdin EOF is the client's FIN
  on the stdin stream. The resize stream carries JSON ``{"Width": w, "Height": h}`` objects.
- WebSocket: each message starts with a channel byte (0 stdin, 1 stdout, 2 stderr, 3 error,
  4 resize); ``base64.`` protocols send text messages with the channel as an ASCII digit and
  base64 data. ``v5.channel.k8s.io`` adds channel 255: ``[255, n]`` closes channel n (stdin EOF).
- The error channel: from v4 on a ``metav1.Status`` JSON (Success; or Failure with reason
  NonZeroExitCode and a cause ExitCode whose message is the code); before v4 plain text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cri_runtime.oci.conmon import Executor, PreparedExec
from cri_runtime.streaming import spdy
from cri_runtime.streaming.websocket import ProtocolError as WsProtocolError
from cri_runtime.streaming.websocket import WebSocket

log = structlog.get_logger("pycri.streaming")

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
SPDY_PROTOCOLS = (V5, V4, V3, V2, V1)
WEBSOCKET_PROTOCOLS = (V5, V4, V1, f"base64.{V5}", f"base64.{V4}", f"base64.{V1}")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
STREAM_CREATION_TIMEOUT = 30.0
# After the process exited, how long to keep copying output a leftover child still writes.
OUTPUT_DRAIN_GRACE = 2.0
# conmon reads attach input in packets of this size at most.
ATTACH_PACKET = 8192
CONMON_STDOUT, CONMON_STDERR = 2, 3
CHUNK = 65536
INITIAL_SIZE_WAIT = 0.5


@dataclass(frozen=True)
class StreamOptions:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


def status_json(exit_code: int | None, message: str = "") -> bytes:
    if exit_code == 0 and not message:
        return json.dumps({"metadata": {}, "status": "Success"}).encode()
    if exit_code is not None and not message:
        return json.dumps(
            {
                "metadata": {},
                "status": "Failure",
                "message": f"command terminated with non-zero exit code: exit status {exit_code}",
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
            }
        ).encode()
    return json.dumps(
        {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"}
    ).encode()


def error_payload(version: str, exit_code: int | None, message: str = "") -> bytes:
    """What goes on the error channel at the end of a session, for this protocol version."""
    if version.removeprefix("base64.") in (V4, V5):
        return status_json(exit_code, message)
    if message:
        return message.encode()
    if exit_code:
        return f"command terminated with non-zero exit code: exit status {exit_code}".encode()
    return b""


class Channels:
    """What an exec or attach session sees of the client, whatever the transport."""

    def __init__(self, options: StreamOptions) -> None:
        self.options = options
        self.gone = asyncio.Event()  # the client went away
        self.resizes: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    async def read_stdin(self) -> bytes:
        raise NotImplementedError

    async def write(self, channel: int, data: bytes) -> None:
        raise NotImplementedError

    async def finish(self, exit_code: int | None, message: str = "") -> None:
        raise NotImplementedError


# --- SPDY transport -----------------------------------------------------------------------


class SpdyChannels(Channels):
    def __init__(self, options: StreamOptions, version: str, connection: spdy.Connection) -> None:
        super().__init__(options)
        self.version = version
        self.connection = connection
        self.streams: dict[str, spdy.Stream] = {}
        self.arrived = asyncio.Event()
        self.bad_stream = False
        self._tasks: set[asyncio.Task[None]] = set()

    def wanted(self) -> set[str]:
        names = {"error"}
        if self.options.stdin:
            names.add("stdin")
        if self.options.stdout:
            names.add("stdout")
        if self.options.stderr and not self.options.tty:
            names.add("stderr")
        if self.options.tty and self.version in (V3, V4, V5):
            names.add("resize")
        return names

    def on_stream(self, stream: spdy.Stream) -> None:
        kind = stream.headers.get("streamtype", "")
        if kind not in ("error", "stdin", "stdout", "stderr", "resize") or kind in self.streams:
            self.bad_stream = True
            self.arrived.set()
            return
        self.streams[kind] = stream
        if kind == "resize":
            task = asyncio.ensure_future(self._read_resizes(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.arrived.set()

    async def wait_streams(self) -> bool:
        async def complete() -> bool:
            while not self.bad_stream and not self.gone.is_set() and not self.wanted() <= set(self.streams):
                self.arrived.clear()
                await self.arrived.wait()
            return not self.bad_stream and not self.gone.is_set()

        try:
            return await asyncio.wait_for(complete(), STREAM_CREATION_TIMEOUT)
        except TimeoutError:
            return False

    async def _read_resizes(self, stream: spdy.Stream) -> None:
        decoder = json.JSONDecoder()
        pending = ""
        while True:
            chunk = await stream.read()
            if not chunk:
                return
            pending += chunk.decode(errors="replace")
            while pending.strip():
                try:
                    event, end = decoder.raw_decode(pending.lstrip())
                except ValueError:
                    if len(pending) > 4096:
                        return  # garbage, not a partial object
                    break
                pending = pending.lstrip()[end:]
                _queue_resize(self.resizes, event)

    async def read_stdin(self) -> bytes:
        stream = self.streams.get("stdin")
        return await stream.read(CHUNK) if stream is not None else b""

    async def write(self, channel: int, data: bytes) -> None:
        stream = self.streams.get("stdout" if channel == STDOUT else "stderr")
        if stream is not None and not stream.reset:
            await stream.write(data)

    async def finish(self, exit_code: int | None, message: str = "") -> None:
        with contextlib.suppress(ConnectionError):
            for name in ("stdout", "stderr"):
                if name in self.streams:
                    await self.streams[name].close()
            error = self.streams.get("error")
            if error is not None:
                payload = error_payload(self.version, exit_code, message)
                if payload:
                    await error.write(payload)
                await error.close()
        for task in self._tasks:
            task.cancel()


def _queue_resize(queue: asyncio.Queue[tuple[int, int]], event: Any) -> None:
    if not isinstance(event, dict):
        return
    width, height = event.get("Width"), event.get("Height")
    if isinstance(width, int) and isinstance(height, int) and 0 <= width < 65536 and 0 <= height < 65536:
        queue.put_nowait((width, height))


# --- WebSocket transport -------------------------------------------------------------------


class WebSocketChannels(Channels):
    def __init__(self, options: StreamOptions, protocol: str, ws: WebSocket) -> None:
        super().__init__(options)
        self.protocol = protocol
        self.base64 = protocol.startswith("base64.")
        self.version = protocol.removeprefix("base64.")
        self.ws = ws
        self._stdin: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

    async def pump(self) -> None:
        """Read client messages until it closes: stdin data, resizes, v5 close signals."""
        try:
            while True:
                message = await self.ws.receive()
                if message is None:
                    break
                _, payload = message
                if not payload:
                    continue
                channel, data = payload[0], payload[1:]
                if self.base64:
                    channel -= ord("0")
                    data = base64.b64decode(data, validate=False)
                if channel == STDIN:
                    if data and self.options.stdin:
                        await self._stdin.put(data)
                elif channel == RESIZE:
                    with contextlib.suppress(ValueError):
                        _queue_resize(self.resizes, json.loads(data))
                elif channel == CLOSE and self.version == V5 and data[:1] == bytes([STDIN]):
                    await self._stdin.put(b"")
        except (WsProtocolError, ValueError, ConnectionError):
            await self.ws.close(1002)
        finally:
            self.gone.set()
            with contextlib.suppress(asyncio.QueueFull):
                self._stdin.put_nowait(b"")

    async def read_stdin(self) -> bytes:
        if not self.options.stdin:
            return b""
        return await self._stdin.get()

    async def _send(self, channel: int, data: bytes) -> None:
        if self.base64:
            await self.ws.send(str(channel).encode() + base64.b64encode(data), text=True)
        else:
            await self.ws.send(bytes([channel]) + data)

    async def write(self, channel: int, data: bytes) -> None:
        await self._send(channel, data)

    async def finish(self, exit_code: int | None, message: str = "") -> None:
        with contextlib.suppress(ConnectionError, OSError):
            payload = error_payload(self.version, exit_code, message)
            if payload:
                await self._send(ERROR, payload)
        await self.ws.close()


# --- exec ------------------------------------------------------------------------------------


async def _pump_output(reader: asyncio.StreamReader, channels: Channels, channel: int) -> None:
    while chunk := await reader.read(CHUNK):
        with contextlib.suppress(ConnectionError, OSError):
            await channels.write(channel, chunk)


async def _pump_stdin(channels: Channels, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await channels.read_stdin():
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def run_exec(channels: Channels, executor: Executor, container_id: str, cmd: list[str]) -> None:
    options = channels.options
    loop = asyncio.get_running_loop()
    size: tuple[int, int] | None = None
    if options.tty:
        # Clients send the terminal's size right after the streams are made: wait a moment
        # for it, so the command starts with the right size rather than 0x0.
        with contextlib.suppress(TimeoutError):
            size = await asyncio.wait_for(channels.resizes.get(), INITIAL_SIZE_WAIT)
    try:
        prepared = await loop.run_in_executor(
            None, lambda: executor.prepare_exec(container_id, cmd, tty=options.tty, console_size=size)
        )
    except Exception as exc:
        await channels.finish(None, str(exc))
        return
    try:
        if options.tty:
            exit_code, message = await _exec_tty(channels, executor, prepared, size)
        else:
            exit_code, message = await _exec_pipes(channels, executor, prepared)
    finally:
        prepared.cleanup()
    if exit_code is None and not message:
        return  # the client went away; nobody to tell
    await channels.finish(exit_code, message)


async def _wait_or_gone(channels: Channels, process: asyncio.subprocess.Process) -> bool:
    """True when the process exited, False when the client went away first."""
    waiter = asyncio.ensure_future(process.wait())
    gone = asyncio.ensure_future(channels.gone.wait())
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiter.done():
        return True
    waiter.cancel()
    return False


async def _kill(executor: Executor, prepared: PreparedExec, process: asyncio.subprocess.Process) -> None:
    await asyncio.get_running_loop().run_in_executor(None, executor.kill_exec, prepared)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


async def _exec_pipes(
    channels: Channels, executor: Executor, prepared: PreparedExec
) -> tuple[int | None, str]:
    options = channels.options
    pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(
        *prepared.argv,
        stdin=pipe if options.stdin else devnull,
        stdout=pipe if options.stdout else devnull,
        stderr=pipe if options.stderr else devnull,
        env=prepared.env,
        start_new_session=True,
    )
    outputs = []
    if process.stdout is not None:
        outputs.append(asyncio.ensure_future(_pump_output(process.stdout, channels, STDOUT)))
    if process.stderr is not None:
        outputs.append(asyncio.ensure_future(_pump_output(process.stderr, channels, STDERR)))
    stdin_task = asyncio.ensure_future(_pump_stdin(channels, process.stdin)) if process.stdin else None
    try:
        if not await _wait_or_gone(channels, process):
            await _kill(executor, prepared, process)
            return None, ""
        if outputs:
            # A child the command left running in the background may hold the pipes open.
            await asyncio.wait(outputs, timeout=OUTPUT_DRAIN_GRACE)
        return process.returncode, ""
    finally:
        for task in [*outputs, *([stdin_task] if stdin_task else [])]:
            task.cancel()
        for task in outputs:
            with contextlib.suppress(BaseException):
                await task
        for transport_owner in (process.stdout, process.stderr):
            if transport_owner is not None:
                transport_owner.feed_eof()
        if process.returncode is None:
            await _kill(executor, prepared, process)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _read_fd(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EIO:  # the terminal's last slave end was closed
                return b""
            raise
        ready = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


async def _write_fd(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        ready = loop.create_future()
        loop.add_writer(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_writer(fd)


def set_terminal_size(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


async def _apply_resizes(channels: Channels, apply: Any) -> None:
    while True:
        width, height = await channels.resizes.get()
        with contextlib.suppress(OSError):
            apply(width, height)


async def _receive_terminal(listener: socket.socket) -> int:
    """Accept the runtime's connection on the console socket; the terminal master it sends."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    connection, _ = await loop.sock_accept(listener)
    with connection:
        connection.settimeout(10)
        _, fds, _, _ = await loop.run_in_executor(None, socket.recv_fds, connection, 4096, 1)
    if not fds:
        raise OSError("the runtime sent no terminal over the console socket")
    return fds[0]


async def _start_tty_exec(
    executor: Executor, prepared: PreparedExec, size: tuple[int, int] | None
) -> tuple[asyncio.subprocess.Process, int, asyncio.Future[bytes] | None, str]:
    """Start the runtime; the terminal master pycri talks to (and an error message, if any)."""
    if prepared.runtime_copies_terminal:
        master, slave = os.openpty()
        if size is not None:
            set_terminal_size(master, *size)  # runc copies it to the container's terminal at start
        try:
            process = await asyncio.create_subprocess_exec(
                *prepared.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=prepared.env,
                start_new_session=True,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return process, master, None, ""
    process = await asyncio.create_subprocess_exec(
        *prepared.argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=prepared.env,
        start_new_session=True,
    )
    assert process.stderr is not None
    errors = asyncio.ensure_future(process.stderr.read(CHUNK))
    receive = asyncio.ensure_future(_receive_terminal(prepared.console_listener))
    waiter = asyncio.ensure_future(process.wait())
    await asyncio.wait({receive, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not receive.done() or receive.exception() is not None:
        receive.cancel()
        if not waiter.done():
            await _kill(executor, prepared, process)
        text = (await errors).decode(errors="replace").strip()
        return process, -1, None, f"exec failed: {text or 'the runtime gave no terminal'}"
    waiter.cancel()
    if size is not None:
        with contextlib.suppress(OSError):
            set_terminal_size(receive.result(), *size)
    return process, receive.result(), errors, ""


async def _exec_tty(
    channels: Channels, executor: Executor, prepared: PreparedExec, size: tuple[int, int] | None
) -> tuple[int | None, str]:
    process, master, errors, message = await _start_tty_exec(executor, prepared, size)
    if message:
        return None, message
    os.set_blocking(master, False)

    def resize(width: int, height: int) -> None:
        set_terminal_size(master, width, height)
        if prepared.runtime_copies_terminal and process.returncode is None:
            process.send_signal(signal.SIGWINCH)  # runc copies its terminal's size on SIGWINCH

    tasks: list[asyncio.Future[Any]] = []
    try:

        async def output() -> None:
            while chunk := await _read_fd(master):
                with contextlib.suppress(ConnectionError, OSError):
                    await channels.write(STDOUT, chunk)

        async def stdin() -> None:
            with contextlib.suppress(OSError):
                while data := await channels.read_stdin():
                    await _write_fd(master, data)

        out = asyncio.ensure_future(output())
        tasks = [out, asyncio.ensure_future(_apply_resizes(channels, resize))]
        if channels.options.stdin:
            tasks.append(asyncio.ensure_future(stdin()))
        if not await _wait_or_gone(channels, process):
            await _kill(executor, prepared, process)
            return None, ""
        await asyncio.wait({out}, timeout=OUTPUT_DRAIN_GRACE)
        return process.returncode, ""
    finally:
        for task in [*tasks, *([errors] if errors else [])]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        os.close(master)
        if process.returncode is None:
            await _kill(executor, prepared, process)


# --- attach ----------------------------------------------------------------------------------


def _connect_attach(path: Path) -> socket.socket:
    """Connect to conmon's attach socket (SOCK_SEQPACKET), whatever the length of its path."""
    directory = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{directory}/{path.name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(directory)
    sock.setblocking(False)
    return sock


def _write_ctl(path: Path, width: int, height: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(fd, f"1 {height} {width}\n".encode())
    finally:
        os.close(fd)


async def run_attach(channels: Channels, executor: Executor, container_id: str, tty: bool) -> None:
    loop = asyncio.get_running_loop()
    try:
        attach_path = executor.attach_socket_path(container_id)
        ctl_path = executor.ctl_fifo_path(container_id)
        sock = await loop.run_in_executor(None, _connect_attach, attach_path)
    except Exception as exc:
        await channels.finish(None, f"cannot attach to container {container_id}: {exc}")
        return

    async def output() -> None:
        while packet := await loop.sock_recv(sock, ATTACH_PACKET + 1):
            channel = STDOUT if packet[0] == CONMON_STDOUT else STDERR if packet[0] == CONMON_STDERR else None
            wanted = channels.options.stdout if channel == STDOUT else channels.options.stderr
            if channel is not None and wanted and len(packet) > 1:
                with contextlib.suppress(ConnectionError, OSError):
                    await channels.write(channel, packet[1:])

    async def stdin() -> None:
        with contextlib.suppress(OSError):
            while data := await channels.read_stdin():
                for start in range(0, len(data), ATTACH_PACKET):
                    await loop.sock_sendall(sock, data[start : start + ATTACH_PACKET])
            if not tty:
                # conmon closes the container's stdin on this unless it keeps stdin open.
                sock.shutdown(socket.SHUT_WR)

    out = asyncio.ensure_future(output())
    tasks = [out, asyncio.ensure_future(_apply_resizes(channels, lambda w, h: _write_ctl(ctl_path, w, h)))]
    if channels.options.stdin:
        tasks.append(asyncio.ensure_future(stdin()))
    gone = asyncio.ensure_future(channels.gone.wait())
    try:
        await asyncio.wait({out, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [*tasks, gone]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        sock.close()
    if not channels.gone.is_set():
        await channels.finish(0)
