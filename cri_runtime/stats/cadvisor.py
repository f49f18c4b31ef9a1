"""cAdvisor-named metrics made from the collectors' samples (ListMetricDescriptors, ListPodSandboxMetrics).

Metric names, help texts and label keys follow cAdvisor, as containerd and CRI-O report
them through ListMetricDescriptors: labels ``id``, ``name``, ``image`` (kubelet adds the
pod's namespace, name and the container name itself), plus ``cpu``, ``interface``,
``device``, ``failure_type`` and ``scope`` where cAdvisor has them. CRI carries metric
values as unsigned integers, so seconds are whole seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cri_runtime.stats.collectors import NS_PER_SECOND, CgroupUsage, ContainerUsage, Network, PodUsage

MetricKind = Literal["counter", "gauge"]

# --- metrics ---------------------------------------------------------------------------------------

BASE_LABELS = ("id", "name", "image")
POD_NAME = "POD"  # the name label of the pod's own series, as CRI-O (and the pause container) give it


@dataclass(frozen=True)
class MetricDescriptor:
    name: str
    help: str
    label_keys: tuple[str, ...]
    kind: MetricKind


@dataclass(frozen=True)
class MetricValue:
    name: str
    timestamp_ns: int
    kind: MetricKind
    label_values: tuple[str, ...]
    value: int


@dataclass(frozen=True)
class PodMetrics:
    pod_id: str
    metrics: tuple[MetricValue, ...]
    containers: tuple[tuple[str, tuple[MetricValue, ...]], ...]  # (container id, its metrics)


def _descriptor(name: str, help: str, kind: MetricKind, *extra: str) -> MetricDescriptor:
    return MetricDescriptor(name, help, (*BASE_LABELS, *extra), kind)


DESCRIPTORS: tuple[MetricDescriptor, ...] = (
    _descriptor(
        "container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", "counter", "cpu"
    ),
    _descriptor(
        "container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds.", "counter"
    ),
    _descriptor(
        "container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds.", "counter"
    ),
    _descriptor(
        "container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals.", "counter"
    ),
    _descriptor(
        "container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals.", "counter"
    ),
    _descriptor(
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        "counter",
    ),
    _descriptor(
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        "gauge",
    ),
    _descriptor("container_memory_working_set_bytes", "Current working set in bytes.", "gauge"),
    _descriptor("container_memory_rss", "Size of RSS in bytes.", "gauge"),
    _descriptor("container_memory_cache", "Number of bytes of page cache memory.", "gauge"),
    _descriptor("container_memory_mapped_file", "Size of memory mapped files in bytes.", "gauge"),
    _descriptor("container_memory_swap", "Container swap usage in bytes.", "gauge"),
    _descriptor("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes", "gauge"),
    _descriptor("container_memory_failcnt", "Number of memory usage hits limits", "counter"),
    _descriptor("container_memory_kernel_usage", "Size of kernel memory allocated in bytes.", "gauge"),
    _descriptor(
        "container_memory_failures_total",
        "Cumulative count of memory allocation failures.",
        "counter",
        "failure_type",
        "scope",
    ),
    _descriptor(
        "container_oom_events_total", "Count of out of memory events observed for the container", "counter"
    ),
    _descriptor("container_spec_memory_limit_bytes", "Memory limit for the container.", "gauge"),
    _descriptor("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container.", "gauge"),
    _descriptor("container_spec_cpu_shares", "CPU share of the container.", "gauge"),
    _descriptor("container_spec_cpu_quota", "CPU quota of the container.", "gauge"),
    _descriptor("container_spec_cpu_period", "CPU period of the container.", "gauge"),
    _descriptor("container_processes", "Number of processes running inside the container.", "gauge"),
    _descriptor("container_threads", "Number of threads running inside the container", "gauge"),
    _descriptor("container_file_descriptors", "Number of open file descriptors for the container.", "gauge"),
    _descriptor("container_sockets", "Number of open sockets for the container.", "gauge"),
    _descriptor("container_last_seen", "Last time a container was seen by the exporter", "gauge"),
    _descriptor(
        "container_blkio_device_usage_total",
        "Blkio device bytes usage",
        "counter",
        "device",
        "major",
        "minor",
        "operation",
    ),
    _descriptor("container_fs_reads_bytes_total", "Cumulative count of bytes read", "counter", "device"),
    _descriptor("container_fs_reads_total", "Cumulative count of reads completed", "counter", "device"),
    _descriptor("container_fs_writes_bytes_total", "Cumulative count of bytes written", "counter", "device"),
    _descriptor("container_fs_writes_total", "Cumulative count of writes completed", "counter", "device"),
    _descriptor(
        "container_threads_max",
        "Maximum number of threads allowed inside the container, infinity if value is zero",
        "gauge",
    ),
    _descriptor(
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        "gauge",
        "device",
    ),
    _descriptor(
        "container_fs_limit_bytes",
        "Number of bytes that can be consumed by the container on this filesystem.",
        "gauge",
        "device",
    ),
    _descriptor("container_fs_inodes_total", "Number of Inodes", "gauge", "device"),
    _descriptor("container_fs_inodes_free", "Number of available Inodes", "gauge", "device"),
    _descriptor(
        "container_start_time_seconds", "Start time of the container since unix epoch in seconds.", "gauge"
    ),
    _descriptor(
        "container_network_receive_bytes_total", "Cumulative count of bytes received", "counter", "interface"
    ),
    _descriptor(
        "container_network_receive_packets_total",
        "Cumulative count of packets received",
        "counter",
        "interface",
    ),
    _descriptor(
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving",
        "counter",
        "interface",
    ),
    _descriptor(
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving",
        "counter",
        "interface",
    ),
    _descriptor(
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted",
        "counter",
        "interface",
    ),
    _descriptor(
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted",
        "counter",
        "interface",
    ),
    _descriptor(
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting",
        "counter",
        "interface",
    ),
    _descriptor(
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting",
        "counter",
        "interface",
    ),
)
_BY_NAME = {d.name: d for d in DESCRIPTORS}


class _Series:
    """Collects the series of one pod or container, all labelled with the same base values."""

    def __init__(self, base: tuple[str, ...], timestamp_ns: int) -> None:
        self.base = base
        self.timestamp_ns = timestamp_ns
        self.values: list[MetricValue] = []

    def add(self, name: str, value: int | None, *extra: str) -> None:
        if value is None or value < 0:
            return
        descriptor = _BY_NAME[name]
        labels = (*self.base, *extra)
        assert len(labels) == len(descriptor.label_keys), name
        self.values.append(MetricValue(name, self.timestamp_ns, descriptor.kind, labels, value))


def _seconds(ns: int | None) -> int | None:
    return ns // NS_PER_SECOND if ns is not None else None


def _cgroup_series(series: _Series, usage: CgroupUsage) -> None:
    cpu, memory, limits = usage.cpu, usage.memory, usage.limits
    series.add("container_cpu_usage_seconds_total", _seconds(cpu.usage_ns), "total")
    series.add("container_cpu_user_seconds_total", _seconds(cpu.user_ns))
    series.add("container_cpu_system_seconds_total", _seconds(cpu.system_ns))
    if limits.cpu_quota is not None:  # as cAdvisor: CFS counters only mean something under a quota
        series.add("container_cpu_cfs_periods_total", cpu.periods)
        series.add("container_cpu_cfs_throttled_periods_total", cpu.throttled_periods)
        series.add("container_cpu_cfs_throttled_seconds_total", _seconds(cpu.throttled_ns))
    series.add("container_memory_usage_bytes", memory.usage)
    series.add("container_memory_working_set_bytes", memory.working_set)
    series.add("container_memory_rss", memory.rss)
    series.add("container_memory_cache", memory.cache)
    series.add("container_memory_mapped_file", memory.mapped_file)
    series.add("container_memory_max_usage_bytes", memory.max_usage)
    series.add("container_memory_failcnt", memory.failcnt)
    for failure_type, scope, value in (
        ("pgfault", "hierarchy", memory.page_faults),
        ("pgmajfault", "hierarchy", memory.major_page_faults),
        ("pgfault", "container", memory.own_page_faults),
        ("pgmajfault", "container", memory.own_major_page_faults),
    ):
        series.add("container_memory_failures_total", value, failure_type, scope)
    series.add("container_oom_events_total", memory.oom_kills)
    if usage.swap is not None:
        series.add("container_memory_swap", usage.swap.usage)
    series.add("container_spec_memory_limit_bytes", limits.memory if limits.memory is not None else 0)
    series.add("container_spec_cpu_shares", limits.cpu_shares)
    series.add("container_spec_cpu_quota", limits.cpu_quota)
    series.add("container_spec_cpu_period", limits.cpu_period)
    processes = usage.processes
    series.add("container_processes", processes.processes)
    series.add("container_threads", processes.threads)
    series.add("container_threads_max", processes.threads_max if processes.threads_max is not None else 0)
    series.add("container_memory_kernel_usage", memory.kernel if memory.kernel is not None else 0)
    swap_limit = limits.memory_and_swap
    series.add("container_spec_memory_swap_limit_bytes", swap_limit if swap_limit is not None else 0)
    series.add("container_last_seen", _seconds(series.timestamp_ns))
    if usage.files is not None:
        series.add("container_file_descriptors", usage.files.descriptors)
        series.add("container_sockets", usage.files.sockets)
    for io in usage.io:
        major, minor = str(io.major), str(io.minor)
        series.add("container_blkio_device_usage_total", io.read_bytes, io.device, major, minor, "Read")
        series.add("container_blkio_device_usage_total", io.write_bytes, io.device, major, minor, "Write")
        series.add("container_fs_reads_bytes_total", io.read_bytes, io.device)
        series.add("container_fs_reads_total", io.reads, io.device)
        series.add("container_fs_writes_bytes_total", io.write_bytes, io.device)
        series.add("container_fs_writes_total", io.writes, io.device)


def _network_series(series: _Series, network: Network) -> None:
    for i in network.interfaces:
        series.add("container_network_receive_bytes_total", i.rx_bytes, i.name)
        series.add("container_network_receive_packets_total", i.rx_packets, i.name)
        series.add("container_network_receive_packets_dropped_total", i.rx_dropped, i.name)
        series.add("container_network_receive_errors_total", i.rx_errors, i.name)
        series.add("container_network_transmit_bytes_total", i.tx_bytes, i.name)
        series.add("container_network_transmit_packets_total", i.tx_packets, i.name)
        series.add("container_network_transmit_packets_dropped_total", i.tx_dropped, i.name)
        series.add("container_network_transmit_errors_total", i.tx_errors, i.name)


def container_metrics(usage: ContainerUsage) -> tuple[MetricValue, ...]:
    container = usage.container
    series = _Series((container.id, container.name, container.image), usage.timestamp_ns)
    if usage.cgroup is not None:
        _cgroup_series(series, usage.cgroup)
        if container.started_at_ns:
            series.add("container_start_time_seconds", _seconds(container.started_at_ns))
    layer = usage.writable_layer
    if layer is not None:
        series.add("container_fs_usage_bytes", layer.used_bytes, layer.device)
        series.add("container_fs_limit_bytes", layer.capacity_bytes, layer.device)
        series.add("container_fs_inodes_total", layer.inodes_total, layer.device)
        series.add("container_fs_inodes_free", layer.inodes_free, layer.device)
    return tuple(series.values)


def pod_metrics(usage: PodUsage) -> PodMetrics:
    """The pod's own series (its cgroup and network, named "POD") and its containers' series."""
    series = _Series((usage.sandbox.id, POD_NAME, ""), usage.timestamp_ns)
    if usage.cgroup is not None:
        _cgroup_series(series, usage.cgroup)
    if usage.network is not None:
        _network_series(series, usage.network)
    containers = tuple(
        (c.container.id, container_metrics(c)) for c in usage.containers if c.container.state == "running"
    )
    return PodMetrics(usage.sandbox.id, tuple(series.values), containers)
