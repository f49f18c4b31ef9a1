"""cgroupfs driver for the v1 hierarchies (and the cgroup2 mount where it is the only one).

Pods get a cgroup under the parent kubelet names; the OCI runtime creates each container's
cgroup below it from the spec's cgroupsPath.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

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
    normal = os.path.normpath("/" + path.lstrip("/"))
    if ".." in normal.split("/"):
        raise ValueError(f"cgroup path {path!r} climbs out of the hierarchy")
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
                    continue
                created.append(current)
                if hierarchy.name == "cpuset" or "cpuset" in hierarchy.name.split(","):
                    _init_cpuset(current)
    except BaseException:
        remove_dirs(created)
        raise
    return created


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


def memory_hierarchy(root: Path = CGROUP_ROOT) -> Path | None:
    if is_cgroup2_only(root):
        return root
    for hierarchy in hierarchies(root):
        if "memory" in hierarchy.name.split(","):
            return hierarchy
    return None
