"""Pod network readiness as the Status RPC reports it, decided by the CNI client itself.

``readiness()`` asks ``cni.CNI.ready()``, so that Status and RunPodSandbox can never
disagree about which network is in use or which plugin is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cri_runtime.cni import CNI

CNI_CONF_DIR = Path("/etc/cni/net.d")
CNI_BIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
CNI_CACHE_DIR = Path("/run/pycri/cni")  # not touched by a readiness check
BUILTIN_PLUGINS = ("bridge", "host-local", "portmap", "loopback")


@dataclass(frozen=True)
class NetworkReadiness:
    ready: bool
    reason: str
    message: str


def readiness(
    conf_dir: Path = CNI_CONF_DIR, bin_dirs: tuple[Path, ...] = CNI_BIN_DIRS, cni: CNI | None = None
) -> NetworkReadiness:
    """The NetworkReady condition: of ``cni`` if given, else of a client for ``conf_dir`` and ``bin_dirs``."""
    client = cni or CNI(conf_dir, list(bin_dirs), CNI_CACHE_DIR)
    ready, message = client.ready()
    return NetworkReadiness(ready, "" if ready else "NetworkPluginNotReady", message)
