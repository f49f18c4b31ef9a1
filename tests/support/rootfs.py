"""A busybox root file system and a minimal OCI runtime spec, for tests that run real containers.

The rootfs is a plain directory (no image, no overlay) so that executor tests depend only on
the OCI runtime and conmon. The spec mirrors what ``runc spec`` writes, trimmed to what both
crun and runc accept on a cgroup v1 host.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cri_runtime.oci import spec

BUSYBOX = Path("/bin/busybox")

# The applets tests call; hardlinks to one static binary keep the rootfs at ~2 MB.
APPLETS = (
    "sh",
    "sleep",
    "echo",
    "cat",
    "id",
    "ls",
    "true",
    "false",
    "kill",
    "printf",
    "yes",
    "head",
    "dd",
    "ps",
    "grep",
    "env",
    "wc",
)

DEFAULT_CAPABILITIES = list(spec.DEFAULT_CAPABILITIES)


def busybox_rootfs(path: Path) -> Path:
    """Make ``path`` a minimal root file system with busybox; return ``path``."""
    for directory in ("bin", "etc", "proc", "dev", "sys", "tmp", "root"):
        (path / directory).mkdir(parents=True, exist_ok=True)
    os.chmod(path / "tmp", 0o1777)
    busybox = path / "bin" / "busybox"
    if not busybox.exists():
        shutil.copy2(BUSYBOX, busybox)
        busybox.chmod(0o755)
    for applet in APPLETS:
        link = path / "bin" / applet
        if not link.exists():
            os.link(busybox, link)
    (path / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (path / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return path


def minimal_spec(
    rootfs: Path,
    args: list[str],
    *,
    cgroups_path: str,
    terminal: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An OCI config.json that crun and runc both run: new pid/ipc/uts/mount/network namespaces."""
    environment = {"PATH": "/bin", "HOME": "/root", **(env or {})}
    if terminal:
        environment.setdefault("TERM", "xterm")
    capabilities = list(DEFAULT_CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [f"{key}={value}" for key, value in environment.items()],
            "cwd": "/",
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        # Absolute, so the bundle directory can live anywhere.
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": "pycri-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network"},
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/asound",
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
