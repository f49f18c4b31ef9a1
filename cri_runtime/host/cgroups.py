"""cgroupfs driver for the v1 hierarchies (and the cgroup2 mount where it is the only one).

Pods get a cgroup under the parent kubelet names; the OCI runtime creates each container's
cgroup below it from the spec's cgroupsPath.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from cri_runtime.errors import from_os_error

log = structlog.get_logger("pycri.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def is_cgroup2_only(root: Path = CGROUP_ROOT) -> bool:
    return (root / "cgroup.controllers").exists()


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """The mounted hierarchies a pod cgroup must exist in."""
    if is_cgroup2_only(root):
        return [root]
    found: list[Path] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            pre, _, post = line.partition(" - ")
            fstype = post.split(" ", 1)[0]
            point = pre.split(" ")[4]
            # Hybrid hosts: the runtimes also make each container's cgroup on the cgroup2
            # "unified" mount, so the pod's cgroup lives (and must be removed) there too.
            if fstype in ("cgroup", "cgroup2") and point.startswith(str(root) + "/"):
                found.append(Path(point))
    return sorted(set(found))


def normalize(path: str) -> str:
    """A cgroupfs path: absolute, no trailing slash, no '..'."""
    if not path:
        raise ValueError("empty cgroup path")
    if "\0" in path or "\n" in path:
        raise ValueError(f"cgroup path {path!r} holds a NUL byte or a newline")
    # Checked before normpath, which would fold "/kubepods/../../escape" into "/escape".
    if ".." in path.split("/"):
        raise ValueError(f"cgroup path {path!r} climbs out of the hierarchy")
    normal = os.path.normpath("/" + path.lstrip("/"))
    if any(len(part.encode()) > 255 for part in normal.split("/")):
        raise ValueError(f"cgroup path {path!r} has a component longer than 255 bytes")
    return normal


def _init_cpuset(directory: Path) -> None:
    """A new v1 cpuset cgroup starts empty and refuses tasks; inherit the parent's sets."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        target = directory / name
        if target.exists() and not target.read_text().strip():
            target.write_text((directory.parent / name).read_text())


def create(path: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Make ``path`` in every hierarchy; return the directories this call created (to undo)."""
    relative = normalize(path).lstrip("/")
    created: list[Path] = []
    try:
        for hierarchy in hierarchies(root):
            current = hierarchy
            for part in relative.split("/"):
                current = current / part
                try:
                    current.mkdir()
                except FileExistsError:
                    if not current.is_dir():  # a control file such as "tasks" or "cpu.shares"
                        raise NotADirectoryError(
                            errno.ENOTDIR, "names a cgroup control file, not a cgroup", str(current)
                        ) from None
                    continue
                created.append(current)
                if hierarchy.name == "cpuset" or "cpuset" in hierarchy.name.split(","):
                    _init_cpuset(current)
    except BaseException:
        remove_dirs(created)
        raise
    return created


def missing(path: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The directories ``create(path)`` would make now."""
    relative = normalize(path).lstrip("/")
    absent: list[Path] = []
    for hierarchy in hierarchies(root):
        current = hierarchy
        for part in relative.split("/"):
            current = current / part
            if not current.exists():
                absent.append(current)
    return absent


def remove_dirs(directories: list[Path], timeout: float = 5.0) -> None:
    """rmdir deepest first; a cgroup whose last task is still exiting is retried briefly."""
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def remove(path: str, root: Path = CGROUP_ROOT, timeout: float = 5.0) -> None:
    """Remove ``path`` (and any leftover children) from every hierarchy; fine if absent."""
    relative = normalize(path).lstrip("/")
    doomed: list[Path] = []
    for hierarchy in hierarchies(root):
        top = hierarchy / relative
        if not top.is_dir():
            continue
        for dirpath, _dirnames, _files in os.walk(top):
            doomed.append(Path(dirpath))
    remove_dirs(doomed, timeout)


def pids(path: str, root: Path = CGROUP_ROOT) -> list[int]:
    relative = normalize(path).lstrip("/")
    for hierarchy in hierarchies(root):
        procs = hierarchy / relative / "cgroup.procs"
        if procs.exists():
            return [int(p) for p in procs.read_text().split()]
    return []


def controllers(root: Path = CGROUP_ROOT) -> dict[str, Path]:
    """Each controller's hierarchy: ``{"memory": /sys/fs/cgroup/memory, ...}``.

    A hybrid host's cgroup2 mount is under "unified"; on a cgroup2-only host every enabled
    controller (and "unified") maps to the root.
    """
    if is_cgroup2_only(root):
        names = (root / "cgroup.controllers").read_text().split()
        return {name: root for name in (*names, "unified")}
    found: dict[str, Path] = {}
    for hierarchy in hierarchies(root):
        for name in hierarchy.name.split(","):
            found.setdefault(name.removeprefix("name="), hierarchy)
    return found


@dataclass(frozen=True)
class Usage:
    """What kubelet's summary API wants from one cgroup; None where the kernel gave nothing."""

    cpu_ns: int | None
    memory_usage: int | None
    working_set: int | None
    rss: int | None
    page_faults: int | None
    major_page_faults: int | None
    memory_limit: int | None


# A cgroup removed meanwhile (ENOENT to open, ENODEV to read an open file) or a controller
# file this kernel lacks: usage is then unknown, which callers expect.
_ABSENT = (errno.ENOENT, errno.ENODEV, errno.ENOTDIR)


def _read_stat_file(path: Path) -> str | None:
    """A statistics file's text, or None when it is absent; other failures are logged."""
    try:
        return path.read_text()
    except OSError as exc:
        if exc.errno not in _ABSENT:
            log.warning("cannot read cgroup statistics", path=str(path), error=str(exc))
        return None


def _read_int(path: Path) -> int | None:
    text = _read_stat_file(path)
    try:
        return int(text.split()[0]) if text is not None else None
    except (ValueError, IndexError):
        return None  # empty, or "max"


def _read_keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read_stat_file(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def usage(path: str, root: Path = CGROUP_ROOT) -> Usage:
    """CPU and memory use of cgroup ``path``: a few small file reads, no subprocess."""
    relative = normalize(path).lstrip("/")
    if is_cgroup2_only(root):
        directory = root / relative
        cpu = _read_keyed(directory / "cpu.stat").get("usage_usec")
        stat = _read_keyed(directory / "memory.stat")
        current = _read_int(directory / "memory.current")
        limit_text = (_read_stat_file(directory / "memory.max") or "").strip()
        inactive = stat.get("inactive_file", 0)
        return Usage(
            cpu * 1000 if cpu is not None else None,
            current,
            max(current - inactive, 0) if current is not None else None,
            stat.get("anon"),
            stat.get("pgfault"),
            stat.get("pgmajfault"),
            int(limit_text) if limit_text.isdigit() else None,
        )
    by_controller = {name: h for h in hierarchies(root) for name in h.name.split(",")}
    cpu = (
        _read_int(by_controller["cpuacct"] / relative / "cpuacct.usage")
        if "cpuacct" in by_controller
        else None
    )
    memory_dir = by_controller["memory"] / relative if "memory" in by_controller else None
    if memory_dir is None:
        return Usage(cpu, None, None, None, None, None, None)
    current = _read_int(memory_dir / "memory.usage_in_bytes")
    stat = _read_keyed(memory_dir / "memory.stat")
    inactive = stat.get("total_inactive_file", 0)
    limit = _read_int(memory_dir / "memory.limit_in_bytes")
    return Usage(
        cpu,
        current,
        max(current - inactive, 0) if current is not None else None,
        stat.get("total_rss"),
        stat.get("total_pgfault"),
        stat.get("total_pgmajfault"),
        limit if limit is not None and limit < (1 << 62) else None,
    )


def apply_limits(
    path: str, *, cpu_shares: int = 0, cpu_quota: int = 0, cpu_period: int = 0, memory: int = 0
) -> None:
    """Write a pod's own limits (its resources plus overhead) on its cgroup; zero means unset.

    A refused write raises the domain error its errno calls for (``errors.from_os_error``).
    """
    relative = normalize(path).lstrip("/")
    if is_cgroup2_only():
        directory = CGROUP_ROOT / relative
        writes = []
        if cpu_shares:
            # The kernel's own conversion from v1 shares to v2 weight.
            writes.append((directory / "cpu.weight", str(1 + ((cpu_shares - 2) * 9999) // 262142)))
        if cpu_quota:
            writes.append(
                (directory / "cpu.max", f"{cpu_quota if cpu_quota > 0 else 'max'} {cpu_period or 100000}")
            )
        if memory:
            writes.append((directory / "memory.max", str(memory)))
    else:
        by_controller = {name: h for h in hierarchies() for name in h.name.split(",")}
        cpu_dir = by_controller["cpu"] / relative if "cpu" in by_controller else None
        memory_dir = by_controller["memory"] / relative if "memory" in by_controller else None
        writes = []
        if cpu_dir is not None:
            if cpu_shares:
                writes.append((cpu_dir / "cpu.shares", str(cpu_shares)))
            if cpu_period:
                writes.append((cpu_dir / "cpu.cfs_period_us", str(cpu_period)))
            if cpu_quota:
                writes.append((cpu_dir / "cpu.cfs_quota_us", str(cpu_quota)))
        if memory and memory_dir is not None:
            writes.append((memory_dir / "memory.limit_in_bytes", str(memory)))
    for target, value in writes:
        try:
            target.write_text(value)
        except OSError as exc:
            # EINVAL: a value the kernel refuses; ENOENT: a controller file this host lacks.
            raise from_os_error(exc, f"cannot set {target.name} = {value} on pod cgroup {path}") from exc
