"""A scripted HTTP server on 127.0.0.1 for registry misbehaviour a real registry won't show:
wrong bytes for a digest, endless manifests, stalls, lying Content-Length."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # Either fixed bytes (sent with a Content-Length) or chunks (sent chunked or raw).
    body: bytes | Callable[[], Iterator[bytes]] = b""
    content_length: int | None = None  # override, to lie about the length
    chunked: bool = False


class FakeRegistry:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {"/v2/": Route(body=b"{}")}
        self.requests: list[str] = []
        self.release = threading.Event()  # set to let stalled responses finish
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                registry.requests.append(path)
                route = registry.routes.get(path)
                if route is None:
                    body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}'
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(route.status)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                try:
                    if isinstance(route.body, bytes):
                        length = route.content_length if route.content_length is not None else len(route.body)
                        self.send_header("Content-Length", str(length))
                        self.end_headers()
                        self.wfile.write(route.body)
                    elif route.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for chunk in route.body():
                            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        if route.content_length is not None:
                            self.send_header("Content-Length", str(route.content_length))
                        self.end_headers()
                        for chunk in route.body():
                            self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stall(self, first: bytes = b"", limit: float = 30.0) -> Callable[[], Iterator[bytes]]:
        """A body that sends ``first`` then nothing until released (or ``limit`` seconds)."""

        def body() -> Iterator[bytes]:
            if first:
                yield first
            self.release.wait(limit)

        return body

    def endless(
        self, chunk: bytes = b" " * 65536, limit_bytes: int = 64 * 1024 * 1024
    ) -> Callable[[], Iterator[bytes]]:
        def body() -> Iterator[bytes]:
            sent = 0
            while sent < limit_bytes:
                yield chunk
                sent += len(chunk)
                time.sleep(0)

        return body

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
