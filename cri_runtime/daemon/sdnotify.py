"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

systemd's Type=notify units wait for ``READY=1`` before they count as started (so
``After=pycri.service`` in kubelet's unit means the socket serves), and ``STOPPING=1``
tells it a shutdown has begun. A name starting with ``@`` is an abstract socket.
Without $NOTIFY_SOCKET (not started by systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1") to the service manager; True when it was sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError:
        # A missing manager must not take the runtime down; systemd times the unit out instead.
        return False
    return True
