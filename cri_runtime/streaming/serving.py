"""What the daemon's small asyncio servers (streaming, metrics) share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def close(server: asyncio.Server | None, sessions: set[asyncio.Task[Any]]) -> None:
    """Stop accepting, cancel the open sessions and wait (briefly) for them and the server."""
    if server is not None:
        server.close()
    for task in list(sessions):
        task.cancel()
    if sessions:
        await asyncio.wait(list(sessions), timeout=5)
    if server is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
