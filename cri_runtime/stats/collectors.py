"""What pods and containers use, as kubelet asks for it: the samples behind CRI stats and metrics.

Everything is read when asked, from the cgroups (v1 hierarchies, a hybrid host's cgroup2
mount, or a cgroup2-only host) and, for a pod's network, over netlink (pyroute2, RTM_GETLINK)
by a short-lived thread that entered the pod's pinned network namespace. No
subprocess, no protobuf: ``StatsCollector`` takes the domain objects of ``state.py`` and
returns dataclasses; the servicer turns them into CRI messages.

Two numbers depend on the past: ``usage_nano_cores`` is the CPU rate between this sample
and the previous one of the same pod or container, so the collector keeps the last sample
of each (and forgets those of pods and containers that are gone).

The cAdvisor-named metrics made from these samples are in ``stats.cadvisor``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from cri_runtime.errors import PycriError
from cri_runtime.host import cgroups
from cri_runtime.network import netns
from cri_runtime.runtime.state import Container, Sandbox
from imageservice.diskusage import disk_usage

# The pod's interface, as pycri asks CNI to name it (and as kubelet calls the default one).
DEFAULT_INTERFACE = "eth0"
# v1 writes "no limit" as the largest page-aligned signed 64-bit number.
_UNLIMITED = 1 << 62
NS_PER_SECOND = 1_000_000_000

log = structlog.get_logger("pycri.stats")

# --- what one sample holds ------------------------------------------------------------------


@dataclass(frozen=True)
class PsiData:
    """One line of a cgroup v2 pressure file: stall time (microseconds) and its running averages (%)."""

    total_us: int
    avg10: float
    avg60: float
    avg300: float


@dataclass(frozen=True)
class Psi:
    """Pressure stall information: some task stalled, and (memory, io; cpu on 5.13+) all stalled."""

    some: PsiData | None
    full: PsiData | None


@dataclass(frozen=True)
class Cpu:
    usage_ns: int | None
    nano_cores: int | None  # rate since the previous sample; None for the first one
    user_ns: int | None
    system_ns: int | None
    periods: int | None  # CFS enforcement periods, throttled ones, time throttled
    throttled_periods: int | None
    throttled_ns: int | None
    psi: Psi | None = None  # cgroup v2 cpu.pressure, when the kernel keeps it


@dataclass(frozen=True)
class Memory:
    usage: int | None
    working_set: int | None
    available: int | None  # the effective limit (own or an ancestor's) minus the working set
    rss: int | None
    cache: int | None
    mapped_file: int | None
    page_faults: int | None  # this cgroup and its descendants
    major_page_faults: int | None
    own_page_faults: int | None  # v1 only: this cgroup alone
    own_major_page_faults: int | None
    failcnt: int | None
    max_usage: int | None
    oom_kills: int | None
    kernel: int | None = None  # kernel memory charged to the cgroup (slab, stacks, ...)
    psi: Psi | None = None  # cgroup v2 memory.pressure


@dataclass(frozen=True)
class Swap:
    usage: int
    available: int | None  # None when no swap limit applies


@dataclass(frozen=True)
class Processes:
    processes: int
    threads: int | None
    threads_max: int | None  # None: no pids limit


@dataclass(frozen=True)
class Limits:
    """The cgroup's own settings, as cAdvisor reports them in container_spec_*."""

    cpu_shares: int | None
    cpu_quota: int | None  # microseconds per period; None when unlimited
    cpu_period: int | None
    memory: int | None  # None when unlimited
    memory_and_swap: int | None = None  # None when unlimited or not accounted


@dataclass(frozen=True)
class DeviceIo:
    """Block I/O of the cgroup (and below) on one device."""

    major: int
    minor: int
    device: str  # /dev/<name>, or "major:minor" when the kernel names none
    read_bytes: int
    write_bytes: int
    reads: int
    writes: int


@dataclass(frozen=True)
class Files:
    descriptors: int  # open file descriptors of all the cgroup's processes
    sockets: int  # of which sockets


@dataclass(frozen=True)
class CgroupUsage:
    cpu: Cpu
    memory: Memory
    swap: Swap | None
    processes: Processes
    limits: Limits
    io: tuple[DeviceIo, ...] = ()
    files: Files | None = None
    io_psi: Psi | None = None  # cgroup v2 io.pressure


@dataclass(frozen=True)
class Filesystem:
    mountpoint: str
    device: str
    used_bytes: int
    inodes_used: int
    capacity_bytes: int
    inodes_total: int
    inodes_free: int


@dataclass(frozen=True)
class Interface:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


@dataclass(frozen=True)
class Network:
    default: Interface | None
    interfaces: tuple[Interface, ...]  # without loopback, as cAdvisor


@dataclass(frozen=True)
class ContainerUsage:
    container: Container
    timestamp_ns: int
    cgroup: CgroupUsage | None  # None unless the container runs
    writable_layer: Filesystem | None


@dataclass(frozen=True)
class PodUsage:
    sandbox: Sandbox
    timestamp_ns: int
    cgroup: CgroupUsage | None  # None for a stopped pod
    network: Network | None  # None for a stopped pod or one in the host's network
    containers: tuple[ContainerUsage, ...]


# --- small readers ------------------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    """The first number in ``path``; None if absent or "max"."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        if value.lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _limited(value: int | None) -> int | None:
    return value if value is not None and 0 <= value < _UNLIMITED else None


def parse_psi(text: str | None) -> Psi | None:
    """A pressure file (``some avg10=0.12 avg60=0.05 avg300=0.01 total=1234`` and a ``full`` line)."""
    if not text:
        return None
    found: dict[str, PsiData] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(part.partition("=")[::2] for part in rest.split())
        try:
            found[kind] = PsiData(
                int(fields["total"]), float(fields["avg10"]), float(fields["avg60"]), float(fields["avg300"])
            )
        except (KeyError, ValueError):
            continue
    if not found:
        return None
    return Psi(found.get("some"), found.get("full"))


def _pressure(h: _Hierarchies, path: str, resource: str) -> Psi | None:
    """cgroup v2 only (a hybrid host keeps it on its cgroup2 mount): absent without CONFIG_PSI or
    with psi=0 on the kernel's command line."""
    directory = h.dir("unified", path)
    return parse_psi(_read_text(directory / f"{resource}.pressure")) if directory is not None else None


def container_cgroup_path(sandbox: Sandbox, container: Container) -> str:
    # Where the runtime made it: below the pod's cgroup, or in a scope of the pod's slice.
    return cgroups.container_path(sandbox.cgroup_path, container.id)


# --- cgroup readers -------------------------------------------------------------------------------


class _Hierarchies:
    """The controller -> hierarchy map, read once per collection (a mountinfo parse)."""

    def __init__(self, root: Path) -> None:
        self.v2 = cgroups.is_cgroup2_only(root)
        self.by_controller = cgroups.controllers(root)

    def dir(self, controller: str, path: str) -> Path | None:
        hierarchy = self.by_controller.get(controller)
        if hierarchy is None:
            return None
        return hierarchy / cgroups.normalize(path).lstrip("/")


def _cpu_details(h: _Hierarchies, path: str) -> tuple[int | None, ...]:
    """User and system time, CFS periods, throttled periods and throttled time (ns)."""
    if h.v2:
        directory = h.dir("cpu", path) or h.dir("unified", path)
        stat = _read_keyed(directory / "cpu.stat") if directory else {}

        def us(key: str) -> int | None:
            return stat[key] * 1000 if key in stat else None

        return (
            us("user_usec"),
            us("system_usec"),
            stat.get("nr_periods"),
            stat.get("nr_throttled"),
            us("throttled_usec"),
        )
    cpuacct = h.dir("cpuacct", path)
    user = _read_int(cpuacct / "cpuacct.usage_user") if cpuacct else None
    system = _read_int(cpuacct / "cpuacct.usage_sys") if cpuacct else None
    cpu = h.dir("cpu", path)
    stat = _read_keyed(cpu / "cpu.stat") if cpu else {}
    return user, system, stat.get("nr_periods"), stat.get("nr_throttled"), stat.get("throttled_time")


def _memory_details(h: _Hierarchies, path: str, base: cgroups.Usage) -> tuple[Memory, Swap | None]:
    directory = h.dir("memory", path)
    if directory is None:
        empty = Memory(*(None,) * 13)
        return empty, None
    stat = _read_keyed(directory / "memory.stat")
    if h.v2:
        # The effective limit is the smallest memory.max on the way up to the root.
        limit: int | None = None
        top = h.by_controller["memory"]
        walk = directory
        while True:
            own = _limited(_read_int(walk / "memory.max"))
            if own is not None:
                limit = own if limit is None else min(limit, own)
            if walk == top or walk.parent == walk:
                break
            walk = walk.parent
        events = _read_keyed(directory / "memory.events")
        swap_usage = _read_int(directory / "memory.swap.current")
        swap_limit = _limited(_read_int(directory / "memory.swap.max"))
        memory = Memory(
            base.memory_usage,
            base.working_set,
            None,
            base.rss,
            stat.get("file"),
            stat.get("file_mapped"),
            base.page_faults,
            base.major_page_faults,
            None,
            None,
            None,
            _read_int(directory / "memory.peak"),
            events.get("oom_kill"),
            stat.get("kernel"),
        )
    else:
        limit = _limited(stat.get("hierarchical_memory_limit", base.memory_limit))
        memsw_limit = _limited(stat.get("hierarchical_memsw_limit"))
        swap_usage = stat.get("total_swap")  # present only with swap accounting
        swap_limit = memsw_limit - limit if memsw_limit is not None and limit is not None else None
        memory = Memory(
            base.memory_usage,
            base.working_set,
            None,
            base.rss,
            stat.get("total_cache"),
            stat.get("total_mapped_file"),
            base.page_faults,
            base.major_page_faults,
            stat.get("pgfault"),
            stat.get("pgmajfault"),
            _read_int(directory / "memory.failcnt"),
            _read_int(directory / "memory.max_usage_in_bytes"),
            _read_keyed(directory / "memory.oom_control").get("oom_kill"),
            _read_int(directory / "memory.kmem.usage_in_bytes"),
        )
    if limit is not None and base.working_set is not None:
        memory = replace(memory, available=max(limit - base.working_set, 0))
    swap = None
    if swap_usage is not None:
        available = max(swap_limit - swap_usage, 0) if swap_limit is not None else None
        swap = Swap(swap_usage, available)
    return memory, swap


def _processes(h: _Hierarchies, path: str) -> Processes:
    """Processes (cgroup.procs of the cgroup and all below), threads and the pids limit."""
    directory = None
    for controller in ("pids", "memory", "cpuacct", "unified"):
        directory = h.dir(controller, path)
        if directory is not None and directory.is_dir():
            break
    processes = threads_counted = 0
    if directory is not None:
        for dirpath, _dirs, _files in os.walk(directory):
            procs = _read_text(Path(dirpath) / "cgroup.procs")
            processes += len(procs.split()) if procs else 0
            tasks = _read_text(Path(dirpath) / ("cgroup.threads" if h.v2 else "tasks"))
            threads_counted += len(tasks.split()) if tasks else 0
    pids = h.dir("pids", path)
    threads = _read_int(pids / "pids.current") if pids else None
    threads_max = _read_int(pids / "pids.max") if pids else None
    return Processes(processes, threads if threads is not None else threads_counted, threads_max)


def _limits(h: _Hierarchies, path: str) -> Limits:
    cpu = h.dir("cpu", path)
    memory = h.dir("memory", path)
    if h.v2:
        weight = _read_int(cpu / "cpu.weight") if cpu else None
        # The inverse of the kernel's shares -> weight conversion (cgroups.apply_limits).
        shares = 2 + ((weight - 1) * 262142) // 9999 if weight else None
        cpu_max = (_read_text(cpu / "cpu.max") or "").split() if cpu else []
        quota = int(cpu_max[0]) if cpu_max and cpu_max[0].isdigit() else None
        period = int(cpu_max[1]) if len(cpu_max) > 1 and cpu_max[1].isdigit() else None
        limit = _limited(_read_int(memory / "memory.max")) if memory else None
        swap = _limited(_read_int(memory / "memory.swap.max")) if memory else None
        both = limit + swap if limit is not None and swap is not None else None
        return Limits(shares, quota, period, limit, both)
    quota = _read_int(cpu / "cpu.cfs_quota_us") if cpu else None
    return Limits(
        _read_int(cpu / "cpu.shares") if cpu else None,
        quota if quota is not None and quota > 0 else None,
        _read_int(cpu / "cpu.cfs_period_us") if cpu else None,
        _limited(_read_int(memory / "memory.limit_in_bytes")) if memory else None,
        _limited(_read_int(memory / "memory.memsw.limit_in_bytes")) if memory else None,
    )


def _device_name(major: int, minor: int) -> str:
    for line in (_read_text(Path(f"/sys/dev/block/{major}:{minor}/uevent")) or "").splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line.partition("=")[2]
    return f"{major}:{minor}"


def _io(h: _Hierarchies, path: str) -> tuple[DeviceIo, ...]:
    """Bytes and operations read and written per block device (v2 io.stat, v1 blkio)."""
    per_device: dict[tuple[int, int], dict[str, int]] = {}

    def add(device: str, key: str, value: int) -> None:
        major, _, minor = device.partition(":")
        if major.isdigit() and minor.isdigit():
            entry = per_device.setdefault((int(major), int(minor)), {})
            entry[key] = entry.get(key, 0) + value

    if h.v2 or "io" in h.by_controller:
        directory = h.dir("io", path) or h.dir("unified", path)
        text = _read_text(directory / "io.stat") if directory else None
        for line in (text or "").splitlines():
            device, *pairs = line.split()
            for pair in pairs:
                key, _, value = pair.partition("=")
                if key in ("rbytes", "wbytes", "rios", "wios") and value.isdigit():
                    add(device, key, int(value))
    else:
        directory = h.dir("blkio", path)
        for name, read_key, write_key in (
            ("io_service_bytes", "rbytes", "wbytes"),
            ("io_serviced", "rios", "wios"),
        ):
            text = None
            if directory is not None:
                text = _read_text(directory / f"blkio.throttle.{name}_recursive")
                if text is None:
                    text = _read_text(directory / f"blkio.throttle.{name}")
            for line in (text or "").splitlines():
                fields = line.split()
                if len(fields) == 3 and fields[2].isdigit():
                    if fields[1] == "Read":
                        add(fields[0], read_key, int(fields[2]))
                    elif fields[1] == "Write":
                        add(fields[0], write_key, int(fields[2]))
    return tuple(
        DeviceIo(
            major,
            minor,
            _device_name(major, minor),
            v.get("rbytes", 0),
            v.get("wbytes", 0),
            v.get("rios", 0),
            v.get("wios", 0),
        )
        for (major, minor), v in sorted(per_device.items())
    )


def _files(h: _Hierarchies, path: str) -> Files | None:
    """Open descriptors and sockets of every process in the cgroup and below."""
    directory = None
    for controller in ("pids", "memory", "cpuacct", "unified"):
        directory = h.dir(controller, path)
        if directory is not None and directory.is_dir():
            break
    else:
        return None  # no hierarchy has the cgroup: it is gone
    descriptors = sockets = 0
    for dirpath, _dirs, _files_here in os.walk(directory):
        for pid in (_read_text(Path(dirpath) / "cgroup.procs") or "").split():
            try:
                entries = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue  # gone meanwhile
            descriptors += len(entries)
            for fd in entries:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        sockets += 1
                except OSError:
                    continue
    return Files(descriptors, sockets)


# --- network ------------------------------------------------------------------------------------


def _interfaces() -> list[Interface]:
    """The interfaces of the calling thread's network namespace, with their 64-bit counters."""
    found: list[Interface] = []
    with netns.netlink() as ipr:
        for link in ipr.link("dump"):
            counters = link.get("stats64")  # IFLA_STATS64
            if counters is None:
                continue
            found.append(
                Interface(
                    link.get("ifname"),
                    counters["rx_bytes"],
                    counters["rx_packets"],
                    counters["rx_errors"],
                    counters["rx_dropped"],
                    counters["tx_bytes"],
                    counters["tx_packets"],
                    counters["tx_errors"],
                    counters["tx_dropped"],
                )
            )
    return found


def read_networks(netns_paths: Sequence[Path]) -> dict[Path, list[Interface] | None]:
    """The interfaces of each pinned network namespace (None where it cannot be read).

    One short-lived thread enters each namespace in turn and asks the kernel over a netlink
    socket opened there: the daemon's other threads never move, and should the way back fail,
    the stranded thread ends instead of serving other calls from a pod's netns.
    """
    results: dict[Path, list[Interface] | None] = dict.fromkeys(netns_paths)

    def work() -> None:
        for path in netns_paths:
            try:
                with netns.enter_netns(path):
                    results[path] = _interfaces()
            except (PycriError, OSError, NetlinkError) as exc:
                # Most often the pod stopped meanwhile and its namespace is gone: no sample.
                log.debug("cannot read a pod's network counters", netns=str(path), error=str(exc))

    if netns_paths:
        netns.in_thread(work, "pycri-netstats")
    return results


def _network(interfaces: list[Interface] | None) -> Network | None:
    if interfaces is None:
        return None
    own = tuple(i for i in interfaces if i.name != "lo")
    default = next((i for i in own if i.name == DEFAULT_INTERFACE), own[0] if own else None)
    return Network(default, own)


# --- the collector --------------------------------------------------------------------------------


class StatsCollector:
    """Reads usage on demand; remembers the last CPU sample of each pod and container."""

    def __init__(self, root: Path = cgroups.CGROUP_ROOT) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._cpu_samples: dict[str, tuple[int, int]] = {}  # key -> (time ns, usage ns)
        self._devices: dict[int, str] = {}  # st_dev -> the mount source holding it

    def _rate(self, key: str, now: int, usage_ns: int | None) -> int | None:
        if usage_ns is None:
            return None
        with self._lock:
            previous = self._cpu_samples.get(key)
            self._cpu_samples[key] = (now, usage_ns)
        if previous is None or now <= previous[0] or usage_ns < previous[1]:
            return None
        return (usage_ns - previous[1]) * NS_PER_SECOND // (now - previous[0])

    def forget_except(self, live_ids: Iterable[str]) -> None:
        """Drop the CPU samples of pods and containers not in ``live_ids``."""
        keep = set(live_ids)
        with self._lock:
            for key in [k for k in self._cpu_samples if k.partition(":")[2] not in keep]:
                del self._cpu_samples[key]

    def _cgroup(self, h: _Hierarchies, key: str, path: str, now: int) -> CgroupUsage | None:
        if not path:
            return None
        base = cgroups.usage(path, self.root)
        if base.cpu_ns is None and base.memory_usage is None:
            return None  # the cgroup is gone (or was never made)
        user, system, periods, throttled, throttled_ns = _cpu_details(h, path)
        cpu = Cpu(
            base.cpu_ns,
            self._rate(key, now, base.cpu_ns),
            user,
            system,
            periods,
            throttled,
            throttled_ns,
            _pressure(h, path, "cpu"),
        )
        memory, swap = _memory_details(h, path, base)
        memory = replace(memory, psi=_pressure(h, path, "memory"))
        return CgroupUsage(
            cpu,
            memory,
            swap,
            _processes(h, path),
            _limits(h, path),
            _io(h, path),
            _files(h, path),
            _pressure(h, path, "io"),
        )

    def _device(self, st_dev: int) -> str:
        with self._lock:
            known = self._devices.get(st_dev)
        if known is not None:
            return known
        wanted = f"{os.major(st_dev)}:{os.minor(st_dev)}"
        device = wanted
        for line in (_read_text(Path("/proc/self/mountinfo")) or "").splitlines():
            pre, _, post = line.partition(" - ")
            if pre.split(" ")[2] == wanted:
                device = post.split(" ")[1]
                break
        with self._lock:
            self._devices[st_dev] = device
        return device

    def _writable_layer(self, container: Container) -> Filesystem | None:
        if not container.dir:
            return None
        upper = Path(container.dir) / "upper"
        try:
            st = os.stat(upper)
            fs = os.statvfs(upper)
        except OSError:
            return None
        used, inodes = disk_usage(upper)
        return Filesystem(
            str(upper),
            self._device(st.st_dev),
            used,
            inodes,
            fs.f_blocks * fs.f_frsize,
            fs.f_files,
            fs.f_ffree,
        )

    def _container(self, h: _Hierarchies, sandbox: Sandbox | None, container: Container) -> ContainerUsage:
        now = time.time_ns()
        usage = None
        if sandbox is not None and container.state == "running":
            usage = self._cgroup(h, f"ctr:{container.id}", container_cgroup_path(sandbox, container), now)
        return ContainerUsage(container, now, usage, self._writable_layer(container))

    def containers(self, items: Sequence[tuple[Sandbox | None, Container]]) -> list[ContainerUsage]:
        """Usage of each container, given with its pod (None if the pod is gone)."""
        h = _Hierarchies(self.root)
        return [self._container(h, sandbox, container) for sandbox, container in items]

    def pods(self, items: Sequence[tuple[Sandbox, Sequence[Container]]]) -> list[PodUsage]:
        """Usage of each pod with its containers; a stopped pod reports none of its own."""
        h = _Hierarchies(self.root)
        wanted = [
            Path(sandbox.netns_path)
            for sandbox, _ in items
            if sandbox.state == "ready" and sandbox.netns_path
        ]
        networks = read_networks(wanted)
        found: list[PodUsage] = []
        for sandbox, members in items:
            # Containers first: the pod's counters, read after theirs, never trail them.
            containers = tuple(self._container(h, sandbox, c) for c in members)
            now = time.time_ns()
            ready = sandbox.state == "ready"
            usage = self._cgroup(h, f"pod:{sandbox.id}", sandbox.cgroup_path, now) if ready else None
            network = (
                _network(networks.get(Path(sandbox.netns_path))) if ready and sandbox.netns_path else None
            )
            found.append(PodUsage(sandbox, now, usage, network, containers))
        return found
