"""pycri's streaming server: exec, attach and port-forward over SPDY/3.1 and WebSocket."""

from cri_runtime.streaming.server import StreamingServer

__all__ = ["StreamingServer"]
