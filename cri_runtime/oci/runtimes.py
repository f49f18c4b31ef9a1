"""OCI runtimes on this host: which exist, which can run here, and why not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("pycri.runtimes")

CANDIDATES = ("crun", "runc")
SEARCH_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    path: str
    version: str
    usable: bool
    reason: str  # why not usable, empty when usable
    mount_options: frozenset[str] = frozenset()  # from `<runtime> features`, when it answers

    @property
    def recursive_read_only(self) -> bool:
        """rro mounts need the runtime's support and the kernel's mount_setattr (5.12+)."""
        return "rro" in self.mount_options and _kernel_at_least(5, 12)


def _find(name: str) -> str | None:
    for directory in SEARCH_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file():
            return str(candidate)
    return shutil.which(name)


def _hybrid_cgroup_controllers(unified: Path = Path("/sys/fs/cgroup/unified")) -> list[str]:
    """Controllers enabled on the cgroup2 mount of a hybrid (v1 + v2) host."""
    try:
        return (unified / "cgroup.controllers").read_text().split()
    except FileNotFoundError:
        return []  # no cgroup2 mount beside the v1 hierarchies: not a hybrid host
    except OSError as exc:
        log.warning("cannot read the hybrid cgroup2 controllers", path=str(unified), error=str(exc))
        return []


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def _mount_options(path: str) -> frozenset[str]:
    """Mount options the runtime says it supports (`features` is an OCI runtime-spec 1.1 command)."""
    try:
        out = subprocess.run([path, "features"], capture_output=True, text=True, timeout=10, check=False)
        if out.returncode != 0:
            return frozenset()  # a runtime older than spec 1.1 has no `features`
        return frozenset(json.loads(out.stdout).get("mountOptions") or ())
    except (OSError, subprocess.TimeoutExpired, ValueError, AttributeError) as exc:
        log.info("runtime features unknown; assuming no optional mount options", runtime=path, error=str(exc))
        return frozenset()


def probe(name: str, unified: Path = Path("/sys/fs/cgroup/unified")) -> RuntimeInfo:
    path = _find(name)
    if path is None:
        return RuntimeInfo(name, "", "", False, f"{name} is not installed (apt-get install {name})")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return RuntimeInfo(
            name,
            path,
            "",
            False,
            f"{path} cannot be run ({exc.strerror}); reinstall it with: apt-get install --reinstall {name}",
        )
    except subprocess.TimeoutExpired as exc:
        return RuntimeInfo(name, path, "", False, f"{path} --version failed: {exc}")
    if out.returncode != 0:
        return RuntimeInfo(name, path, "", False, f"{path} --version failed: {out.stderr.strip()}")
    version = out.stdout.splitlines()[0].strip() if out.stdout else ""
    if name == "crun":
        controllers = _hybrid_cgroup_controllers(unified)
        if controllers:
            return RuntimeInfo(
                name,
                path,
                version,
                False,
                "crun refuses hybrid cgroup hosts whose cgroup2 mount holds controllers "
                f"({', '.join(controllers)} on {unified}); mount them on a v1 hierarchy, "
                "e.g. mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb",
            )
    return RuntimeInfo(name, path, version, True, "", _mount_options(path))


def detect() -> dict[str, RuntimeInfo]:
    return {name: probe(name) for name in CANDIDATES}


def choose_default(preferred: str, runtimes: dict[str, RuntimeInfo]) -> tuple[RuntimeInfo | None, str]:
    """The runtime to use by default and a sentence saying why."""
    first = runtimes.get(preferred)
    if first and first.usable:
        return first, f"using {first.name} ({first.path}, {first.version})"
    for info in runtimes.values():
        if info.usable:
            why = first.reason if first else f"{preferred} is unknown"
            return info, f"using {info.name} ({info.path}) because {preferred} cannot run here: {why}"
    reasons = "; ".join(f"{i.name}: {i.reason}" for i in runtimes.values())
    return None, f"no usable OCI runtime: {reasons}"
