"""What the kernel says about processes and cgroups, read from /proc and /sys/fs/cgroup: how tests
check what pycri did without asking pycri."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from cri_runtime.host import cgroups

# How much slower than this host the machine running the tests is, for the few tests that bound
# a duration: vm/guest-test sets it for a guest under qemu's TCG (emulated CPU).
TIME_SCALE = float(os.environ.get("PYCRI_TEST_TIME_SCALE", "1"))


def processes_of(workdir: Path) -> list[str]:
    """Live conmon monitors and pod inits that belong to the daemon in ``workdir``.

    Scoped to this daemon, so other pycri instances on the machine do not disturb the check;
    zombies (waiting for this VM's slow init to reap them) are not alive.
    """
    found = []
    marker = str(workdir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        if rest.split()[0] == "Z":
            continue
        if (comm == "conmon" and marker in argv) or (comm == "catatonit" and marker in environ):
            found.append(f"{comm}:{entry.name}")
    return found


def process_gone(pid: int) -> bool:
    """The process has exited: no such PID, or a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def _signal_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def catches(pid: int, signum: signal.Signals) -> bool:
    """The process has a handler for ``signum`` (a shell's ``trap 'cmd' SIG`` is in place)."""
    return bool(_signal_mask(pid, "SigCgt") & (1 << (signum - 1)))


def ignores(pid: int, signum: signal.Signals) -> bool:
    """The process ignores ``signum`` (a shell's ``trap '' SIG`` is in place)."""
    return bool(_signal_mask(pid, "SigIgn") & (1 << (signum - 1)))


def cgroup_cpu_ns(cgroup_path: str) -> int:
    """The kernel's count of CPU time used by a cgroup and all below it, in nanoseconds."""
    hierarchies = cgroups.controllers()
    relative = cgroup_path.lstrip("/")
    if "cpuacct" in hierarchies:
        return int((hierarchies["cpuacct"] / relative / "cpuacct.usage").read_text())
    stat = dict(
        line.split() for line in (hierarchies["cpu"] / relative / "cpu.stat").read_text().splitlines()
    )
    return int(stat["usage_usec"]) * 1000


def memory_usage_bytes(cgroup_path: str) -> int:
    """The memory the kernel charges to a cgroup (and below), page cache and tmpfs included."""
    hierarchies = cgroups.controllers()
    directory = hierarchies["memory"] / cgroup_path.lstrip("/")
    for name in ("memory.usage_in_bytes", "memory.current"):
        if (directory / name).exists():
            return int((directory / name).read_text())
    raise AssertionError(f"no memory usage file in {directory}")


@dataclass(frozen=True)
class CgroupLimits:
    """A cgroup's limits by logical name, read from whichever files the host has: cgroup v1
    (``memory.limit_in_bytes``, ``cpu.shares``, ``cpu.cfs_*``, each controller's hierarchy) or v2
    (``memory.max``, ``cpu.weight``, ``cpu.max``, ``pids.max`` on the unified root). None: no limit
    (or no such controller here). ``cpu`` is ``cpu.shares`` on v1 and ``cpu.weight`` on v2: compare
    it with ``cpu_value(shares)``."""

    memory: int | None
    cpu: int | None
    cpu_quota: int | None
    cpu_period: int | None
    pids: int | None


def _limit(path: Path) -> int | None:
    """A limit file's number; None for "max", v1's "unlimited" (2^63 rounded to pages, or -1)
    and a file this host lacks."""
    try:
        text = path.read_text().split()[0]
    except FileNotFoundError:
        return None
    if text == "max" or int(text) < 0 or int(text) >= 1 << 62:
        return None
    return int(text)


def cgroup_limits(cgroup_path: str) -> CgroupLimits:
    """The limits the kernel enforces on ``cgroup_path`` (a pod's ``cgroupPath``, or
    ``container_cgroup``'s path: a directory under the cgroupfs driver, a slice or scope under
    the systemd driver)."""
    hierarchies = cgroups.controllers()
    relative = cgroup_path.lstrip("/")
    memory = hierarchies["memory"] / relative
    cpu = hierarchies["cpu"] / relative
    pids = hierarchies["pids"] / relative if "pids" in hierarchies else None
    if (cpu / "cpu.max").exists():
        quota, period = (cpu / "cpu.max").read_text().split()
        return CgroupLimits(
            memory=_limit(memory / "memory.max"),
            cpu=_limit(cpu / "cpu.weight"),
            cpu_quota=None if quota == "max" else int(quota),
            cpu_period=int(period),
            pids=_limit(pids / "pids.max") if pids is not None else None,
        )
    return CgroupLimits(
        memory=_limit(memory / "memory.limit_in_bytes"),
        cpu=_limit(cpu / "cpu.shares"),
        cpu_quota=_limit(cpu / "cpu.cfs_quota_us"),
        cpu_period=_limit(cpu / "cpu.cfs_period_us"),
        pids=_limit(pids / "pids.max") if pids is not None else None,
    )


def cpu_value(cpu_shares: int) -> int:
    """What ``CgroupLimits.cpu`` reads after ``cpu_shares`` was asked: the shares on cgroup v1,
    the weight runc, crun, systemd and pycri convert them to on v2."""
    if (cgroups.controllers()["cpu"] / "cpu.shares").exists():
        return cpu_shares
    return cgroups.shares_to_weight(cpu_shares)


def oom_kills(cgroup_path: str) -> int | None:
    """The kernel's count of OOM kills in the cgroup and below (v2's ``memory.events``), or
    None on cgroup v1 (whose ``memory.oom_control`` counts only its own)."""
    events = cgroups.controllers()["memory"] / cgroup_path.lstrip("/") / "memory.events"
    if not events.exists():
        return None
    counts = dict(line.split() for line in events.read_text().splitlines())
    return int(counts["oom_kill"])
