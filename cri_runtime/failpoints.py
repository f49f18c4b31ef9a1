"""Named crash points, for testing that pycri recovers from a kill -9 at any step.

``PYCRI_FAILPOINTS=sandbox.after_cni,container.after_conmon`` in pycri's environment makes the
daemon SIGKILL itself when it reaches one of those points: no cleanup, no flush, exactly what a
crash or an OOM kill does. Unset (always, outside tests) every point is a set lookup.

The points, in the order a call reaches them:
  sandbox.recorded, sandbox.after_netns, sandbox.after_cgroup, sandbox.after_init,
  sandbox.after_cni, sandbox.after_shm, sandbox.stop_recorded, sandbox.stop_after_cni,
  sandbox.remove_recorded, sandbox.remove_after_teardown,
  container.recorded, container.after_mount, container.after_conmon, container.after_start,
  container.stop_after_kill, container.remove_recorded, container.remove_after_delete,
  image.after_download, image.after_layer, image.remove_after_record
"""

from __future__ import annotations

import os
import signal
import sys

_ARMED = frozenset(p.strip() for p in os.environ.get("PYCRI_FAILPOINTS", "").split(",") if p.strip())


def hit(name: str) -> None:
    """Die here, at once, if ``name`` is armed."""
    if name in _ARMED:
        sys.stderr.write(f"pycri: failpoint {name}: killing myself\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
