"""What the kernel says about processes and cgroups, read from /proc and /sys/fs/cgroup: how tests
check what pycri did without asking pycri."""

from __future__ import annotations

import signal
from pathlib import Path

from cri_runtime.host import cgroups


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
