"""What pycri knows about pod networking at this stage: where CNI config and plugins are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CNI_CONF_DIR = Path("/etc/cni/net.d")
CNI_BIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
BUILTIN_PLUGINS = ("bridge", "host-local", "portmap", "loopback")


@dataclass(frozen=True)
class NetworkReadiness:
    ready: bool
    reason: str
    message: str


def readiness(conf_dir: Path = CNI_CONF_DIR, bin_dirs: tuple[Path, ...] = CNI_BIN_DIRS) -> NetworkReadiness:
    def find(plugin: str) -> Path | None:
        return next((d / plugin for d in bin_dirs if (d / plugin).is_file()), None)

    configs = sorted(p for p in conf_dir.glob("*.conflist")) if conf_dir.is_dir() else []
    if configs:
        return NetworkReadiness(True, "", f"CNI config {configs[0]}")
    missing = [p for p in BUILTIN_PLUGINS if find(p) is None]
    if missing:
        return NetworkReadiness(
            False,
            "NetworkPluginNotReady",
            f"no CNI config in {conf_dir} and the built-in bridge network lacks plugins {missing} "
            f"in {', '.join(map(str, bin_dirs))} (apt-get install containernetworking-plugins)",
        )
    return NetworkReadiness(True, "", "built-in bridge network")
