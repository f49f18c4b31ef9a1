"""Pod and container stats and metrics, as kubelet reads them over CRI, from real pods.

Each test runs a real pycri daemon with runc and with crun, real containers that burn CPU,
fill memory and exchange traffic with the host, and compares what CRI reports with what the kernel shows.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from cri_runtime.host import cgroups
from tests.support.host import cgroup_cpu_ns
from tests.support.pods import Env, container_cgroup, container_pid, exec_out, pod_cgroup, wait_exited
from tests.support.wait import wait_for

pytestmark = pytest.mark.root

MB = 1024 * 1024
NS_PER_SECOND = 1_000_000_000


# --- helpers ---------------------------------------------------------------------------------------


def pod_stats(cri: CRIClient, pod: str) -> pb.PodSandboxStats:
    return cri.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod), timeout=30).stats


def list_pod_stats(
    cri: CRIClient, wanted: pb.PodSandboxStatsFilter | None = None
) -> list[pb.PodSandboxStats]:
    request = pb.ListPodSandboxStatsRequest(filter=wanted)
    return list(cri.runtime.ListPodSandboxStats(request, timeout=30).stats)


def container_stats(cri: CRIClient, cid: str) -> pb.ContainerStats:
    return cri.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid), timeout=30).stats


def by_id(stats: pb.PodSandboxStats) -> dict[str, pb.ContainerStats]:
    return {c.attributes.id: c for c in stats.linux.containers}


def processes_in(cgroup_path: str) -> tuple[int, int]:
    """(processes in the cgroup and all below, processes directly in it), from the kernel."""
    hierarchies = cgroups.controllers()
    top = (hierarchies.get("pids") or hierarchies["memory"]) / cgroup_path.lstrip("/")
    own = len((top / "cgroup.procs").read_text().split())
    total = sum(len((Path(d) / "cgroup.procs").read_text().split()) for d, _, _ in os.walk(top))
    return total, own


def sockets_of(pid: int) -> int:
    """How many sockets the process holds open, from its file descriptors."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def code_of(call, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value.code()


# --- pod stats -------------------------------------------------------------------------------------


def test_pod_stats_show_a_busy_containers_cpu_rate_and_growing_working_set(env: Env) -> None:
    pod = env.pod("busy-pod", labels={"app": "busy"})
    burner = env.run(pod, "burner", ["sh", "-c", "while :; do :; done"])
    holder = env.run(pod, "holder", ["sleep", "1000"])
    first = pod_stats(env.cri, pod)
    assert first.attributes.id == pod
    assert first.attributes.metadata.name == "busy-pod" and first.attributes.labels["app"] == "busy"
    assert set(by_id(first)) == {burner, holder}
    # A rate is over the time between two samples. However loaded the machine, wait until the
    # kernel has counted a second of CPU for the busy loop (polling the kernel, not pycri, whose
    # samples would move the rate's start), then compare what CRI says with the kernel's counters.
    cgroup = pod_cgroup(env.cri, pod)
    counters = {
        "pod": cgroup,
        "burner": container_cgroup(env.cri, pod, burner),
        "holder": container_cgroup(env.cri, pod, holder),
    }
    start = {name: cgroup_cpu_ns(path) for name, path in counters.items()}
    assert wait_for(lambda: cgroup_cpu_ns(counters["burner"]) - start["burner"] >= NS_PER_SECOND, timeout=120)
    second = pod_stats(env.cri, pod)
    end = {name: cgroup_cpu_ns(path) for name, path in counters.items()}
    samples = {
        "pod": (first.linux.cpu, second.linux.cpu),
        "burner": (by_id(first)[burner].cpu, by_id(second)[burner].cpu),
        "holder": (by_id(first)[holder].cpu, by_id(second)[holder].cpu),
    }
    for name, (before, after) in samples.items():
        # The totals are the kernel's: read before its counter at the start, after it at the end.
        assert before.usage_core_nano_seconds.value <= start[name], name
        assert after.usage_core_nano_seconds.value <= end[name], name
        # The rate is what the totals say over the time between the two samples.
        used = after.usage_core_nano_seconds.value - before.usage_core_nano_seconds.value
        elapsed = after.timestamp - before.timestamp
        assert after.usage_nano_cores.value == pytest.approx(
            used * NS_PER_SECOND / elapsed, rel=0.01, abs=1
        ), name
    burning = by_id(second)[burner]
    assert burning.cpu.usage_core_nano_seconds.value >= start["burner"] + NS_PER_SECOND
    assert second.linux.cpu.usage_core_nano_seconds.value >= start["pod"] + NS_PER_SECOND
    # A busy loop next to a sleeping process: the busy one has the higher rate, and the pod's
    # rate includes it (the pod was sampled a moment after its containers, over the same time).
    assert by_id(second)[holder].cpu.usage_nano_cores.value < burning.cpu.usage_nano_cores.value
    assert second.linux.cpu.usage_nano_cores.value > by_id(second)[holder].cpu.usage_nano_cores.value
    # The pod's CPU is its containers' and then some: never less than the busy one's.
    assert second.linux.cpu.usage_core_nano_seconds.value >= burning.cpu.usage_core_nano_seconds.value
    # Memory: 40 MB written into the pod's /dev/shm by a process in the holder's cgroup.
    before_pod = second.linux.memory.working_set_bytes.value
    before_holder = by_id(second)[holder].memory.working_set_bytes.value
    exec_out(env.cri, holder, "dd", "if=/dev/zero", "of=/dev/shm/fill", "bs=1M", "count=40")
    third = pod_stats(env.cri, pod)
    assert third.linux.memory.working_set_bytes.value - before_pod >= 35 * MB
    assert by_id(third)[holder].memory.working_set_bytes.value - before_holder >= 35 * MB
    assert third.linux.memory.usage_bytes.value >= third.linux.memory.working_set_bytes.value
    assert third.linux.memory.page_faults.value > 0
    assert third.linux.memory.timestamp > 0 and third.linux.cpu.timestamp > 0


def test_pod_process_count_matches_the_kernel(env: Env) -> None:
    pod = env.pod("procs")
    one = env.run(pod, "one", ["sleep", "1000"])
    three = env.run(pod, "three", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    cgroup = pod_cgroup(env.cri, pod)

    def settled() -> int | None:
        # The containers' own cgroups hold their four processes; the pod's whole tree holds them
        # and whatever else the driver puts there: under the systemd driver each container's conmon,
        # in a pycri-conmon-<id>.scope of the pod's slice (host/systemd.py), charged to the pod.
        in_containers = sum(processes_in(container_cgroup(env.cri, pod, cid))[0] for cid in (one, three))
        total = processes_in(cgroup)[0]
        return total if in_containers == 4 and total >= 4 else None

    counted = wait_for(settled, timeout=15)
    assert counted, processes_in(cgroup)
    stats = pod_stats(env.cri, pod)
    assert stats.linux.process.timestamp > 0
    assert stats.linux.process.process_count.value == counted == processes_in(cgroup)[0]


def fetch(url: str, timeout: float = 15) -> bytes:
    """GET ``url`` (a pod's IP), retrying while the server in the pod starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_pod_network_counters_grow_with_traffic_from_the_host(env: Env) -> None:
    pod = env.pod("talker")
    serve = "head -c 200000 /dev/zero > /www/big; exec httpd -f -p 8080 -h /www"
    env.run(pod, "web", ["sh", "-c", serve])
    ip = env.cri.pod_status(pod).status.network.ip
    assert ip.startswith(env.subnet_prefix)
    before = pod_stats(env.cri, pod).linux.network
    assert before.timestamp > 0
    assert before.default_interface.name == "eth0"
    assert [i.name for i in before.interfaces] == ["eth0"]  # no loopback, as cAdvisor
    # Received: datagrams from the host to the pod's IP. Sent: a 200 kB file served to the host.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(20):
            sender.sendto(b"x" * 1000, (ip, 9))
    assert len(fetch(f"http://{ip}:8080/big")) == 200000
    after = pod_stats(env.cri, pod).linux.network
    assert after.default_interface.rx_bytes.value - before.default_interface.rx_bytes.value >= 20 * 1000
    assert after.default_interface.tx_bytes.value - before.default_interface.tx_bytes.value >= 200000
    assert after.default_interface.rx_errors.value == 0 and after.default_interface.tx_errors.value == 0
    assert after.interfaces[0].rx_bytes.value == after.default_interface.rx_bytes.value
    # A pod in the host's network namespace has no network of its own to report.
    host = env.pod("on-host", host_network=True)
    assert not pod_stats(env.cri, host).linux.HasField("network")


def test_list_pod_stats_filters_and_errors(env: Env) -> None:
    first = env.pod("list-a", labels={"app": "a"})
    second = env.pod("list-b", labels={"app": "b"})
    in_second = env.run(second, "c", ["sleep", "1000"])
    assert {s.attributes.id for s in list_pod_stats(env.cri)} == {first, second}
    chosen = list_pod_stats(env.cri, pb.PodSandboxStatsFilter(label_selector={"app": "b"}))
    assert [s.attributes.id for s in chosen] == [second]
    assert [c.attributes.id for c in chosen[0].linux.containers] == [in_second]
    assert [s.attributes.id for s in list_pod_stats(env.cri, pb.PodSandboxStatsFilter(id=first[:10]))] == [
        first
    ]
    assert list_pod_stats(env.cri, pb.PodSandboxStatsFilter(id=first, label_selector={"app": "b"})) == []
    # The streaming forms answer the same, with the same filters.
    streamed = env.cri.runtime.StreamPodSandboxStats(
        pb.StreamPodSandboxStatsRequest(filter=pb.PodSandboxStatsFilter(label_selector={"app": "b"})),
        timeout=30,
    )
    assert [s.attributes.id for m in streamed for s in m.pod_sandbox_stats] == [second]
    by_container = env.cri.runtime.StreamContainerStats(
        pb.StreamContainerStatsRequest(filter=pb.ContainerStatsFilter(pod_sandbox_id=second)), timeout=30
    )
    assert [s.attributes.id for m in by_container for s in m.container_stats] == [in_second]
    metrics = env.cri.runtime.StreamPodSandboxMetrics(pb.StreamPodSandboxMetricsRequest(), timeout=30)
    assert {p.pod_sandbox_id for m in metrics for p in m.pod_sandbox_metrics} == {first, second}
    listed = env.cri.runtime.StreamContainers(pb.StreamContainersRequest(), timeout=30)
    assert [c.id for m in listed for c in m.containers] == [in_second]
    pods = env.cri.runtime.StreamPodSandboxes(pb.StreamPodSandboxesRequest(), timeout=30)
    assert {p.id for m in pods for p in m.pod_sandboxes} == {first, second}
    assert code_of(pod_stats, env.cri, "0" * 64) == grpc.StatusCode.NOT_FOUND
    assert code_of(pod_stats, env.cri, "") == grpc.StatusCode.INVALID_ARGUMENT


def test_a_stopped_pod_reports_no_usage(env: Env) -> None:
    pod = env.pod("stopping")
    cid = env.run(pod, "c", ["sleep", "1000"])
    running = pod_stats(env.cri, pod)
    assert running.linux.cpu.HasField("usage_core_nano_seconds") and running.linux.HasField("network")
    env.cri.stop_pod(pod)
    stopped = pod_stats(env.cri, pod)
    assert stopped.attributes.id == pod
    for part in ("cpu", "memory", "network", "process"):
        assert not stopped.linux.HasField(part), part
    [container] = stopped.linux.containers
    assert container.attributes.id == cid
    assert not container.cpu.HasField("usage_core_nano_seconds")
    assert not container.memory.HasField("working_set_bytes")
    # Still listed, with no usage either.
    [listed] = list_pod_stats(env.cri)
    assert listed.attributes.id == pod and not listed.linux.HasField("cpu")


# --- container stats --------------------------------------------------------------------------------


def test_container_stats_report_limits_swap_and_the_writable_layer(env: Env) -> None:
    pod = env.pod("limited")
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="capped"),
        image=pb.ImageSpec(image=env.image),
        command=["sh", "-c", "head -c 3000000 /dev/urandom > /tmp/blob; mkdir /tmp/d; sleep 1000"],
        log_path="capped.log",
    )
    config.linux.resources.memory_limit_in_bytes = 96 * MB
    cid = env.cri.create_container(pod, "capped", env.image, config=config)
    env.cri.start_container(cid)

    def layer_filled() -> pb.ContainerStats | None:
        stats = container_stats(env.cri, cid)
        return stats if stats.writable_layer.used_bytes.value >= 3_000_000 else None

    stats = wait_for(layer_filled, timeout=15)
    assert stats, "the container's file never showed in its writable layer"
    memory = stats.memory
    assert memory.working_set_bytes.value > 0 and memory.rss_bytes.value >= 0
    assert memory.available_bytes.value + memory.working_set_bytes.value == 96 * MB
    assert memory.page_faults.value > 0 and memory.HasField("major_page_faults")
    assert stats.writable_layer.inodes_used.value >= 3  # /tmp, /tmp/blob, /tmp/d
    assert stats.writable_layer.fs_id.mountpoint.endswith("/upper")
    # Swap: reported when the kernel accounts for it, and never more than the host has.
    hierarchies = cgroups.controllers()
    accounted = any(
        (hierarchies["memory"] / name).exists()
        for name in ("memory.memsw.usage_in_bytes", "memory.swap.current", "cgroup.controllers")
    )
    if accounted:
        assert stats.swap.timestamp > 0 and stats.swap.HasField("swap_usage_bytes")
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        assert stats.swap.swap_usage_bytes.value <= int(meminfo["SwapTotal"].split()[0]) * 1024
    # An exited container keeps its writable layer but reports no CPU or memory.
    env.cri.stop_container(cid, timeout=0)
    wait_exited(env.cri, cid)
    done = container_stats(env.cri, cid)
    assert not done.cpu.HasField("usage_core_nano_seconds")
    assert done.writable_layer.used_bytes.value >= 3_000_000


def test_container_and_pod_stats_carry_pressure_stall_information_from_cgroup_v2(env: Env) -> None:
    unified = cgroups.controllers().get("unified")
    if unified is None or not (unified / "cpu.pressure").exists():
        pytest.skip("no cgroup2 hierarchy with pressure files (CONFIG_PSI, psi=1) on this host")
    pod = env.pod("pressured")
    cid = env.cri.create_container(
        pod, "burner", env.image, command=["sh", "-c", "while :; do :; done"], log_path="burner.log"
    )
    env.cri.start_container(cid)
    directory = unified / container_cgroup(env.cri, pod, cid).lstrip("/")

    def totals() -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for resource in ("cpu", "memory", "io"):
            lines = (directory / f"{resource}.pressure").read_text().splitlines()
            out[resource] = {line.split()[0]: int(line.rsplit("total=", 1)[1]) for line in lines}
        return out

    time.sleep(1)
    before = totals()
    stats = container_stats(env.cri, cid)
    after = totals()
    # The kernel's microseconds as CRI's nanoseconds, read between the two samples of the file.
    for resource, usage in (("cpu", stats.cpu), ("memory", stats.memory), ("io", stats.io)):
        psi = usage.psi
        for kind, data in (("some", psi.Some), ("full", psi.Full)):
            if kind not in before[resource]:
                continue
            assert before[resource][kind] * 1000 <= data.Total <= after[resource][kind] * 1000, (
                resource,
                kind,
            )
            assert 0 <= data.Avg10 <= 100 and 0 <= data.Avg60 <= 100 and 0 <= data.Avg300 <= 100
    assert stats.cpu.psi.HasField("Some") and stats.memory.psi.HasField("Full") and stats.io.timestamp > 0
    pod_usage = pod_stats(env.cri, pod)
    assert pod_usage.linux.cpu.psi.HasField("Some") and pod_usage.linux.io.psi.HasField("Some")


# --- metrics ----------------------------------------------------------------------------------------


def test_metrics_are_described_labelled_and_match_the_stats(env: Env) -> None:
    descriptors = env.cri.runtime.ListMetricDescriptors(
        pb.ListMetricDescriptorsRequest(), timeout=30
    ).descriptors
    described = {d.name: list(d.label_keys) for d in descriptors}
    assert len(described) == len(descriptors)
    assert all(d.help for d in descriptors)
    for name in (
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_rss",
        "container_memory_usage_bytes",
        "container_network_receive_bytes_total",
        "container_network_transmit_bytes_total",
        "container_processes",
        "container_fs_usage_bytes",
    ):
        assert described[name][:3] == ["id", "name", "image"], name
    assert described["container_network_receive_bytes_total"][-1] == "interface"

    pod = env.pod("measured")
    stopped = env.pod("stopped")
    env.cri.stop_pod(stopped)
    busy = env.run(pod, "busy", ["sh", "-c", "while :; do :; done"])
    filler = env.run(pod, "filler", ["sh", "-c", "dd if=/dev/zero of=/dev/shm/f bs=1M count=30; sleep 1000"])
    listener = env.run(pod, "listener", ["nc", "-l", "-p", "8080"])
    # The filler has written its 30 MB, the listener listens.
    assert wait_for(lambda: container_stats(env.cri, filler).memory.working_set_bytes.value >= 30 * MB)
    listener_pid = container_pid(env.cri, listener)
    assert wait_for(lambda: sockets_of(listener_pid) >= 1)
    before = container_stats(env.cri, busy).cpu.usage_core_nano_seconds.value
    response = env.cri.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(), timeout=30)
    after = container_stats(env.cri, busy).cpu.usage_core_nano_seconds.value
    assert [p.pod_sandbox_id for p in response.pod_metrics] == [pod]  # a stopped pod has none
    [measured] = response.pod_metrics
    series = list(measured.metrics) + [m for c in measured.container_metrics for m in c.metrics]
    assert series
    for metric in series:
        assert metric.name in described, metric.name
        assert len(metric.label_values) == len(described[metric.name]), metric.name
        assert metric.timestamp > 0
        gauge_named_total = metric.name == "container_fs_inodes_total"  # cAdvisor's name for a gauge
        counter = (metric.name.endswith("_total") and not gauge_named_total) or metric.name.endswith(
            "failcnt"
        )
        assert metric.metric_type == (pb.MetricType.COUNTER if counter else pb.MetricType.GAUGE), metric.name

    def value(metrics, name: str, *labels: str) -> int:  # type: ignore[no-untyped-def]
        found = [m for m in metrics if m.name == name and tuple(m.label_values[3:]) == labels]
        assert len(found) == 1, (name, labels, found)
        return int(found[0].value.value)

    containers = {c.container_id: list(c.metrics) for c in measured.container_metrics}
    assert set(containers) == {busy, filler, listener}
    for cid, name in ((busy, "busy"), (filler, "filler"), (listener, "listener")):
        labels = {tuple(m.label_values[:3]) for m in containers[cid]}
        assert labels == {(cid, name, env.image)}
    # CPU in whole seconds, between two samples of the same counter taken around it.
    cpu_seconds = value(containers[busy], "container_cpu_usage_seconds_total", "total")
    assert before // 1_000_000_000 <= cpu_seconds <= after // 1_000_000_000
    assert value(containers[filler], "container_memory_working_set_bytes") >= 30 * MB
    assert value(containers[filler], "container_memory_usage_bytes") >= 30 * MB
    cgroup = pod_cgroup(env.cri, pod)
    for cid in (busy, filler):
        assert (
            value(containers[cid], "container_processes")
            == processes_in(container_cgroup(env.cri, pod, cid))[0]
        )
    assert value(containers[busy], "container_start_time_seconds") == (
        env.cri.container_status(busy).status.started_at // 1_000_000_000
    )
    # The listening socket, and stdio besides; the busy loop holds no socket.
    assert value(containers[listener], "container_sockets") >= 1
    assert value(containers[listener], "container_file_descriptors") >= 4
    assert value(containers[busy], "container_sockets") == 0
    seen = value(containers[busy], "container_last_seen")
    assert abs(seen - time.time()) < 30
    # Present even when zero (critest asks for them): kernel memory, the swap limit.
    for name in ("container_memory_kernel_usage", "container_spec_memory_swap_limit_bytes"):
        value(containers[busy], name)
    for name in (
        "container_blkio_device_usage_total",
        "container_fs_reads_bytes_total",
        "container_fs_reads_total",
        "container_fs_writes_bytes_total",
        "container_fs_writes_total",
    ):
        assert name in described, name
    fs = [m for m in containers[busy] if m.name == "container_fs_usage_bytes"]
    assert len(fs) == 1 and fs[0].label_values[3]  # labelled with the device
    # The pod's own series: its cgroup and its network, named "POD".
    assert {tuple(m.label_values[:3]) for m in measured.metrics} == {(pod, "POD", "")}
    assert value(measured.metrics, "container_processes") == processes_in(cgroup)[0]
    received = value(measured.metrics, "container_network_receive_bytes_total", "eth0")
    assert received <= pod_stats(env.cri, pod).linux.network.default_interface.rx_bytes.value
    assert value(measured.metrics, "container_memory_working_set_bytes") >= 30 * MB
