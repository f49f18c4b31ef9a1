"""The cgroup driver interface, and the cgroupfs driver for v1, hybrid and v2-only hosts.

A driver decides where a pod's cgroup is and who makes it, what a container's OCI ``cgroupsPath``
is, where conmon goes, and what flags the runtimes and conmon get. ``CgroupfsDriver`` (here):
pods get a cgroup under the parent kubelet names, written directly in cgroupfs, and the OCI
runtime creates each container's cgroup below it. ``SystemdDriver`` (``host/systemd.py``): pods are
slices and containers scopes, made through systemd.

Every pod record keeps its cgroup's cgroupfs path (for the systemd driver, the slice's place in
the tree), so statistics and recovery read the kernel's files without asking a driver.
"""

from __future__ import annotations

import abc
import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from cri_runtime.errors import FailedPrecondition, InvalidArgument, from_os_error

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


def enable_controllers(root: Path, relative: str) -> None:
    """cgroup v2: let ``relative`` have the controllers its parents have, as runc and crun do for
    a container's cgroup: each ancestor below the root enables in ``cgroup.subtree_control`` what
    its ``cgroup.controllers`` offers and is not enabled yet. Without it a new pod cgroup has no
    ``cpu.max`` or ``memory.max`` to write."""
    current = root
    for part in relative.split("/"):
        wanted = set((current / "cgroup.controllers").read_text().split())
        enabled = set((current / "cgroup.subtree_control").read_text().split())
        missing_here = sorted(wanted - enabled)
        if missing_here:
            try:
                (current / "cgroup.subtree_control").write_text(" ".join("+" + c for c in missing_here))
            except OSError as exc:
                # EBUSY: processes live in this cgroup (no internal processes on v2); the write
                # that needs the controller then fails with its own error.
                log.warning(
                    "cannot enable cgroup controllers",
                    cgroup=str(current),
                    controllers=missing_here,
                    error=str(exc),
                )
        current = current / part


def create(path: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Make ``path`` in every hierarchy; return the directories this call created (to undo)."""
    relative = normalize(path).lstrip("/")
    created: list[Path] = []
    try:
        if is_cgroup2_only(root) and relative:
            # Made first, so the directories below see the controllers as they are created.
            for i in range(1, len(relative.split("/")) + 1):
                step = root / "/".join(relative.split("/")[:i])
                try:
                    step.mkdir()
                    created.append(step)
                except FileExistsError:
                    if not step.is_dir():
                        raise NotADirectoryError(
                            errno.ENOTDIR, "names a cgroup control file, not a cgroup", str(step)
                        ) from None
            enable_controllers(root, relative)
            return created
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


def memory_held(path: str, root: Path = CGROUP_ROOT) -> int | None:
    """cgroup v2: what the cgroup holds that reclaim cannot give back (``memory.current`` less
    its file cache; tmpfs and shared memory stay), or None when this is not known (cgroup v1,
    no such cgroup)."""
    if not is_cgroup2_only(root):
        return None
    directory = root / normalize(path).lstrip("/")
    current = _read_int(directory / "memory.current")
    if current is None:
        return None
    stat = _read_keyed(directory / "memory.stat")
    return max(current - stat.get("file", 0) + stat.get("shmem", 0), 0)


def v2_cgroup_of(pid: int, root: Path = CGROUP_ROOT) -> str | None:
    """The cgroup of process ``pid`` on a cgroup2-only host (``/proc/<pid>/cgroup``'s ``0::``
    line), or None on v1 and hybrid hosts or when the process is gone."""
    if not is_cgroup2_only(root):
        return None
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def check_memory_fits(path: str, limit: int, what: str, root: Path = CGROUP_ROOT) -> None:
    """Refuse a memory limit below what ``path`` holds and cannot give back.

    cgroup v1 refuses such a ``memory.limit_in_bytes`` itself (EBUSY); cgroup v2 takes the
    ``memory.max`` and OOM-kills the cgroup's processes to meet it, which for a pod is its
    infrastructure and every container. So on v2 pycri asks first, as the v1 kernel would.
    """
    held = memory_held(path, root)
    if limit > 0 and held is not None and held > limit:
        raise FailedPrecondition(
            f"cannot set memory.max = {limit} on {what}: it holds {held} bytes that cannot be "
            "reclaimed (memory.current less file cache); lowering the limit below that would OOM-kill it"
        )


def apply_limits(
    path: str,
    *,
    cpu_shares: int = 0,
    cpu_quota: int = 0,
    cpu_period: int = 0,
    memory: int = 0,
    existing_only: bool = False,
) -> None:
    """Write a pod's own limits (its resources plus overhead) on its cgroup; zero means unset.

    A refused write raises the domain error its errno calls for (``errors.from_os_error``).
    ``existing_only``: skip the files the cgroup does not have (yet): the systemd driver's
    pod slice, whose controllers systemd enables when it realizes the unit.
    """
    relative = normalize(path).lstrip("/")
    if is_cgroup2_only():
        directory = CGROUP_ROOT / relative
        writes = []
        if cpu_shares:
            writes.append((directory / "cpu.weight", str(shares_to_weight(cpu_shares))))
        if cpu_quota:
            writes.append(
                (directory / "cpu.max", f"{cpu_quota if cpu_quota > 0 else 'max'} {cpu_period or 100000}")
            )
        if memory:
            check_memory_fits(path, memory, f"pod cgroup {path}")
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
        if existing_only and not target.exists():
            continue
        try:
            target.write_text(value)
        except OSError as exc:
            if exc.errno == errno.EBUSY and target.name.startswith("memory."):
                # Not transient: the pod holds more memory than the new limit (tmpfs, unreclaimable).
                raise FailedPrecondition(
                    f"cannot set {target.name} = {value} on pod cgroup {path}: the pod uses more than that"
                ) from exc
            # EINVAL: a value the kernel refuses; ENOENT: a controller file this host lacks.
            raise from_os_error(exc, f"cannot set {target.name} = {value} on pod cgroup {path}") from exc


def shares_to_weight(cpu_shares: int) -> int:
    """The kernel's (and runc's, crun's, systemd's) conversion of v1 cpu.shares to v2 cpu.weight."""
    return 1 + ((max(2, min(cpu_shares, 262144)) - 2) * 9999) // 262142


# A container's cgroup under a systemd pod slice (host/systemd.py names the scope so too).
SYSTEMD_SCOPE_PREFIX = "pycri"


def container_path(pod_path: str, container_id: str) -> str:
    """The cgroupfs path of a container's cgroup, from its pod's: a pod that is a systemd slice
    holds its containers in scopes, a cgroupfs pod in directories named by ID."""
    if pod_path.endswith(".slice"):
        return f"{pod_path.rstrip('/')}/{SYSTEMD_SCOPE_PREFIX}-{container_id}.scope"
    return f"{pod_path.rstrip('/')}/{container_id}"


class CgroupDriver(abc.ABC):
    """Where pods and containers get their cgroups, and who makes them."""

    name: str
    # Global flags for crun and runc, and flags for conmon, that select this driver.
    runtime_args: tuple[str, ...] = ()
    conmon_args: tuple[str, ...] = ()

    def close(self) -> None:  # noqa: B027 (most drivers hold nothing)
        """Release what the driver holds (a D-Bus connection)."""

    @abc.abstractmethod
    def pod_cgroup(self, sandbox_id: str, cgroup_parent: str) -> str:
        """The cgroupfs path of the pod's cgroup for kubelet's ``cgroup_parent`` (InvalidArgument)."""

    @abc.abstractmethod
    def pod_missing(self, pod_path: str) -> list[str]:
        """What ``create_pod`` would make now (recorded before it does, for recovery)."""

    @abc.abstractmethod
    def create_pod(self, pod_path: str, description: str = "") -> list[str]:
        """Make the pod's cgroup where missing; return what this call made (to undo)."""

    @abc.abstractmethod
    def apply_pod_limits(
        self, pod_path: str, *, cpu_shares: int = 0, cpu_quota: int = 0, cpu_period: int = 0, memory: int = 0
    ) -> None:
        """Size the pod's cgroup; zero means unset."""

    @abc.abstractmethod
    def remove_pod(self, pod_path: str, created: list[str]) -> None:
        """Remove what ``create_pod`` made (``created``), with whatever is left below it."""

    @abc.abstractmethod
    def container_cgroups_path(self, pod_path: str, container_id: str) -> str:
        """The OCI spec's ``linux.cgroupsPath`` for a container of this pod."""

    def conmon_cgroup(self, pod_path: str) -> str | None:
        """Where a container's conmon goes; None: it stays in pycri's cgroup."""
        return None

    def enter_conmon(self, pid: int, conmon_cgroup: str, container_id: str, created: list[str]) -> None:
        """Move a conmon that has not forked yet into ``conmon_cgroup``; add what was made to
        ``created`` as soon as it exists."""
        raise NotImplementedError

    def remove_conmon_cgroup(self, created: list[str]) -> None:  # noqa: B027
        """Undo ``enter_conmon`` once conmon is dead."""

    @abc.abstractmethod
    def remove_container(self, pod_path: str, container_id: str, timeout: float = 5.0) -> None:
        """Take away a container's cgroup that its runtime left behind; fine if absent."""

    def release_container(self, container_id: str) -> None:  # noqa: B027
        """After the runtime's delete: take away what the driver keeps per container (units)."""

    def sweep(self, orphan_pods: Iterable[str], orphan_containers: Iterable[str]) -> list[str]:
        """Take away what the driver keeps for these pods and containers, which no record knows
        (found by ID in this instance's own state); return what it took away."""
        return []


class CgroupfsDriver(CgroupDriver):
    """Pod cgroups written in cgroupfs; containers' made by the runtime below them."""

    name = "cgroupfs"

    def __init__(self, default_parent: str = "/pycri") -> None:
        self.default_parent = default_parent

    def pod_cgroup(self, sandbox_id: str, cgroup_parent: str) -> str:
        if os.path.basename(cgroup_parent.rstrip("/")).endswith(".slice"):
            # As CRI-O: a slice means kubelet drives systemd; a directory of that name would
            # put the pod where neither systemd nor kubelet looks.
            raise InvalidArgument(
                f"pod linux.cgroup_parent {cgroup_parent!r} is a systemd slice, but pycri's cgroup_driver "
                "is cgroupfs: set kubelet's cgroupDriver and pycri's cgroup_driver to the same driver"
            )
        try:
            return normalize(cgroup_parent or f"{self.default_parent}/{sandbox_id}")
        except ValueError as exc:
            raise InvalidArgument(f"pod linux.cgroup_parent: {exc}") from exc

    def pod_missing(self, pod_path: str) -> list[str]:
        return [str(p) for p in missing(pod_path)]

    def create_pod(self, pod_path: str, description: str = "") -> list[str]:
        try:
            return [str(p) for p in create(pod_path)]
        except NotADirectoryError as exc:
            raise InvalidArgument(f"pod linux.cgroup_parent {pod_path!r}: {exc}") from None

    def apply_pod_limits(
        self, pod_path: str, *, cpu_shares: int = 0, cpu_quota: int = 0, cpu_period: int = 0, memory: int = 0
    ) -> None:
        apply_limits(
            pod_path, cpu_shares=cpu_shares, cpu_quota=cpu_quota, cpu_period=cpu_period, memory=memory
        )

    def remove_pod(self, pod_path: str, created: list[str]) -> None:
        """Remove the pod cgroup if pycri made it (with whatever the runtime left below it), then
        the parents pycri made that no other pod uses now."""
        if not created:
            return
        mine = {str(h / pod_path.lstrip("/")) for h in hierarchies()}
        if any(p in mine for p in created):
            remove(pod_path)
        for parent in sorted(
            (Path(p) for p in created if p not in mine), key=lambda p: len(p.parts), reverse=True
        ):
            try:
                parent.rmdir()
            except OSError as exc:  # busy (another pod lives there) is expected
                log.debug("pod cgroup parent kept", path=str(parent), error=str(exc))

    def container_cgroups_path(self, pod_path: str, container_id: str) -> str:
        return container_path(pod_path, container_id)

    def enter_conmon(self, pid: int, conmon_cgroup: str, container_id: str, created: list[str]) -> None:
        made = create(conmon_cgroup)
        created.extend(str(p) for p in made)
        relative = normalize(conmon_cgroup).lstrip("/")
        for hierarchy in hierarchies():
            (hierarchy / relative / "cgroup.procs").write_text(str(pid))

    def remove_conmon_cgroup(self, created: list[str]) -> None:
        remove_dirs([Path(p) for p in created], timeout=1.0)

    def remove_container(self, pod_path: str, container_id: str, timeout: float = 5.0) -> None:
        remove(container_path(pod_path, container_id), timeout=timeout)
