"""The CRI RuntimeService: protobuf in, manager calls (in worker threads), protobuf out.

RPCs not implemented yet answer UNIMPLEMENTED with their name.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import structlog

from cri_runtime import __version__
from cri_runtime.api import api_pb2 as pb
from cri_runtime.api import api_pb2_grpc as pb_grpc
from cri_runtime.cri import convert
from cri_runtime.cri.convert import (
    container_status,
    container_to_proto,
    sandbox_metadata,
    sandbox_status,
    sandbox_to_proto,
)
from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.host import idmap
from cri_runtime.network.cni import CNI
from cri_runtime.oci.runtimes import RuntimeInfo
from cri_runtime.runtime import checkpoint
from cri_runtime.runtime.containers import ContainerManager
from cri_runtime.runtime.events import ContainerEvent
from cri_runtime.runtime.pods import Pods
from cri_runtime.runtime.sandboxes import SandboxManager
from cri_runtime.runtime.state import Container
from cri_runtime.stats import cadvisor, collectors
from cri_runtime.streaming.server import StreamingServer, check_streams


class DaemonConfig(Protocol):
    """What the servicer reads of the daemon's configuration (cri_runtime.daemon.config.Config)."""

    @property
    def cgroup_driver(self) -> str: ...

    @property
    def root(self) -> str: ...

    @property
    def checkpoint_dir(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


log = structlog.get_logger("pycri.runtime_service")

RUNTIME_NAME = "pycri"
RUNTIME_API_VERSION = "v1"
T = TypeVar("T")


# The OCI runtimes that join a user namespace given by path with its mappings.
USERNS_RUNTIMES = frozenset(("crun", "runc"))


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def _log_if_abandoned(task: asyncio.Future[Any]) -> None:
    """A shielded task whose caller went away: nobody else will see how it ended."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a call finished with an error after its caller left", error=str(task.exception()))


def _read_spec(path: Path) -> Any:
    """The container's OCI spec as written to its bundle, or None once the bundle is gone."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _labels_match(labels: dict[str, str], selector: Any) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _container_matches(
    container: Container, wanted: pb.ContainerFilter | pb.ContainerStatsFilter | None
) -> bool:
    """The filters ListContainers and ListContainerStats share (id and pod prefixes, labels, state)."""
    if wanted is None:
        return True
    if wanted.id and not container.id.startswith(wanted.id):
        return False
    if wanted.pod_sandbox_id and not container.pod_id.startswith(wanted.pod_sandbox_id):
        return False
    if (
        isinstance(wanted, pb.ContainerFilter)
        and wanted.HasField("state")
        and convert.CONTAINER_STATES[container.state] != wanted.state.state
    ):
        return False
    return _labels_match(container.labels, wanted.label_selector)


_EVENT_TYPES = {
    "created": pb.ContainerEventType.CONTAINER_CREATED_EVENT,
    "started": pb.ContainerEventType.CONTAINER_STARTED_EVENT,
    "stopped": pb.ContainerEventType.CONTAINER_STOPPED_EVENT,
    "deleted": pb.ContainerEventType.CONTAINER_DELETED_EVENT,
}


class RuntimeService(pb_grpc.RuntimeServiceServicer):
    # Set by serve() once the streaming server listens; Exec, Attach and PortForward need it.
    streaming: StreamingServer | None = None

    def __init__(
        self,
        config: DaemonConfig,
        runtimes: dict[str, RuntimeInfo],
        default: RuntimeInfo | None,
        why: str,
        pods: Pods | None = None,
        cni: CNI | None = None,
    ) -> None:
        self.config = config
        self.runtimes = runtimes
        self.default_runtime = default
        self.default_reason = why
        self.pods = pods
        self.cni = cni
        # ListContainers' messages, built once per container and state (the only field of a
        # pb.Container that changes in a container's life): kubelet lists every second.
        self._listed: dict[str, tuple[str, pb.Container]] = {}

    def _listed_container(self, container: Container) -> pb.Container:
        cached = self._listed.get(container.id)
        if cached is None or cached[0] != container.state:
            cached = (container.state, container_to_proto(container))
            self._listed[container.id] = cached
        return cached[1]

    def _pods(self) -> Pods:
        assert self.pods is not None
        return self.pods

    def _managers(self) -> tuple[SandboxManager, ContainerManager]:
        """For reads, which answer from memory without the pods' locks."""
        pods = self._pods()
        return pods.sandboxes, pods.containers

    # --- runtime ------------------------------------------------------------------

    async def Version(
        self, request: pb.VersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.VersionResponse:
        return pb.VersionResponse(
            version="0.1.0",
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        runtime_ready = pb.RuntimeCondition(type="RuntimeReady", status=self.default_runtime is not None)
        if self.default_runtime is None:
            runtime_ready.reason = "NoOCIRuntime"
            runtime_ready.message = self.default_reason
        if self.cni is not None:
            ready, message = await _in_thread(self.cni.ready)  # reads the conf dir and plugin dirs
        else:
            ready, message = False, "no CNI configured"
        network_ready = pb.RuntimeCondition(type="NetworkReady", status=ready)
        if not ready:
            network_ready.reason = "NetworkPluginNotReady"
            network_ready.message = message
        usable = {n: info for n, info in self.runtimes.items() if info.usable}
        # Asked once in the daemon's life (idmap.support caches it): a short-lived helper process.
        userns_ok = not await _in_thread(idmap.support, Path(self.config.root))
        handlers = []
        for name, handler in (("", self.default_runtime), *usable.items()):
            if handler is None:
                continue
            features = pb.RuntimeHandlerFeatures(
                recursive_read_only_mounts=handler.recursive_read_only,
                # crun and runc join the pod's user namespace; pycri makes the idmapped mounts.
                user_namespaces=userns_ok and handler.name in USERNS_RUNTIMES,
            )
            handlers.append(pb.RuntimeHandler(name=name, features=features))
        response = pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=[runtime_ready, network_ready]),
            runtime_handlers=handlers,
            # spec.resolve_user honours supplemental_groups_policy (Merge and Strict).
            features=pb.RuntimeFeatures(supplemental_groups_policy=True),
        )
        if request.verbose:
            info: dict[str, Any] = {
                "defaultRuntime": self.default_runtime.name if self.default_runtime else "",
                "defaultRuntimeReason": self.default_reason,
                "runtimes": {
                    n: {"path": i.path, "version": i.version, "usable": i.usable, "reason": i.reason}
                    for n, i in self.runtimes.items()
                },
                "network": message,
                "config": self.config.to_dict(),
            }
            response.info["config"] = json.dumps(info)
        return response

    async def RuntimeConfig(
        self, request: pb.RuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.RuntimeConfigResponse:
        driver = (
            pb.CgroupDriver.SYSTEMD if self.config.cgroup_driver == "systemd" else pb.CgroupDriver.CGROUPFS
        )
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))

    async def UpdateRuntimeConfig(
        self, request: pb.UpdateRuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr and self.cni is not None:
            self.cni.set_pod_cidr(cidr)
        return pb.UpdateRuntimeConfigResponse()

    # --- pod sandboxes --------------------------------------------------------------

    async def RunPodSandbox(
        self, request: pb.RunPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunPodSandboxResponse:
        config = convert.pod_sandbox_config(request.config)
        sandbox = await _in_thread(self._pods().run_pod, config, request.runtime_handler)
        return pb.RunPodSandboxResponse(pod_sandbox_id=sandbox.id)

    async def StopPodSandbox(
        self, request: pb.StopPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopPodSandboxResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id is empty")
        await _in_thread(self._pods().stop_pod, request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    async def RemovePodSandbox(
        self, request: pb.RemovePodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemovePodSandboxResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id is empty")
        await _in_thread(self._pods().remove_pod, request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    async def PodSandboxStatus(
        self, request: pb.PodSandboxStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.PodSandboxStatusResponse:
        sandboxes, containers = self._managers()
        sandbox = sandboxes.get(request.pod_sandbox_id)
        # With the pod's containers and a timestamp, as kubelet's evented PLEG reads them.
        response = pb.PodSandboxStatusResponse(
            status=sandbox_status(sandbox),
            containers_statuses=[container_status(c) for c in containers.in_pod(sandbox.id)],
            timestamp=time.time_ns(),
        )
        if request.verbose:
            response.info["info"] = json.dumps(
                {
                    "pid": sandbox.init_pid,
                    "cgroupPath": sandbox.cgroup_path,
                    "netns": sandbox.netns_path,
                    "hostname": sandbox.hostname,
                    "runtimeHandler": sandbox.runtime_handler,
                    "containers": [c.id for c in containers.in_pod(sandbox.id)],
                }
            )
        return response

    async def ListPodSandbox(
        self, request: pb.ListPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPodSandboxResponse:
        sandboxes, _ = self._managers()
        wanted = request.filter if request.HasField("filter") else None
        items = []
        for sandbox in sandboxes.all():
            if wanted is not None:
                if wanted.id and not sandbox.id.startswith(wanted.id):
                    continue
                if wanted.HasField("state") and convert.sandbox_state(sandbox) != wanted.state.state:
                    continue
                if not _labels_match(sandbox.labels, wanted.label_selector):
                    continue
            items.append(sandbox_to_proto(sandbox))
        return pb.ListPodSandboxResponse(items=items)

    # --- containers -------------------------------------------------------------------

    async def CreateContainer(
        self, request: pb.CreateContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateContainerResponse:
        config = convert.container_config(request.config)
        container = await _in_thread(self._pods().create_container, request.pod_sandbox_id, config)
        return pb.CreateContainerResponse(container_id=container.id)

    async def StartContainer(
        self, request: pb.StartContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartContainerResponse:
        await _in_thread(self._pods().start_container, request.container_id)
        return pb.StartContainerResponse()

    async def StopContainer(
        self, request: pb.StopContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopContainerResponse:
        # Shielded: a caller that goes away does not cut the stop short; it finishes (the grace
        # period, then SIGKILL) and releases what it holds, while this call returns at once.
        stop = asyncio.ensure_future(
            self._pods().stop_container_async(request.container_id, float(request.timeout))
        )
        try:
            await asyncio.shield(stop)
        except asyncio.CancelledError:
            stop.add_done_callback(_log_if_abandoned)
            raise
        return pb.StopContainerResponse()

    async def RemoveContainer(
        self, request: pb.RemoveContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id is empty")
        await _in_thread(self._pods().remove_container, request.container_id)
        return pb.RemoveContainerResponse()

    async def CheckpointContainer(
        self, request: pb.CheckpointContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id is empty")
        wanted = checkpoint.CheckpointRequest(
            request.container_id, request.location, float(request.timeout), context.time_remaining()
        )
        _, containers = self._managers()
        await _in_thread(
            checkpoint.checkpoint_container, containers, wanted, Path(self.config.checkpoint_dir)
        )
        return pb.CheckpointContainerResponse()

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContainersResponse:
        _, containers = self._managers()
        wanted = request.filter if request.HasField("filter") else None
        present = containers.all()
        items = [self._listed_container(c) for c in present if _container_matches(c, wanted)]
        if len(self._listed) > len(present):
            live = {c.id for c in present}
            for gone in [cid for cid in self._listed if cid not in live]:
                del self._listed[gone]
        return pb.ListContainersResponse(containers=items)

    async def ContainerStatus(
        self, request: pb.ContainerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContainerStatusResponse:
        _, containers = self._managers()
        container = containers.get(request.container_id)
        response = pb.ContainerStatusResponse(status=container_status(container))
        if request.verbose:
            info: dict[str, Any] = {
                "pid": container.pid,
                "sandboxID": container.pod_id,
                "runtime": container.runtime,
                "rootfs": container.rootfs,
            }
            spec = await _in_thread(_read_spec, container.bundle_dir / "config.json")
            if spec is not None:
                info["runtimeSpec"] = spec
            response.info["info"] = json.dumps(info)
        return response

    async def ExecSync(
        self, request: pb.ExecSyncRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecSyncResponse:
        timeout = float(request.timeout) if request.timeout > 0 else None
        result = await self._pods().exec_sync_async(request.container_id, list(request.cmd), timeout)
        return pb.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    async def UpdateContainerResources(
        self, request: pb.UpdateContainerResourcesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateContainerResourcesResponse:
        if not request.HasField("linux"):
            raise InvalidArgument("UpdateContainerResources: linux resources are required on Linux")
        resources = convert.linux_resources(request.linux)
        await _in_thread(self._pods().update_container_resources, request.container_id, resources)
        return pb.UpdateContainerResourcesResponse()

    async def UpdatePodSandboxResources(
        self, request: pb.UpdatePodSandboxResourcesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePodSandboxResourcesResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("UpdatePodSandboxResources: pod_sandbox_id is empty")
        if not request.HasField("resources") and not request.HasField("overhead"):
            raise InvalidArgument("UpdatePodSandboxResources: neither resources nor overhead is set")
        resources = convert.linux_resources(request.resources) if request.HasField("resources") else None
        overhead = convert.linux_resources(request.overhead) if request.HasField("overhead") else None
        await _in_thread(self._pods().update_pod_resources, request.pod_sandbox_id, resources, overhead)
        return pb.UpdatePodSandboxResourcesResponse()

    # --- stats --------------------------------------------------------------------------

    _METRIC_TYPES = {"counter": pb.MetricType.COUNTER, "gauge": pb.MetricType.GAUGE}

    @functools.cached_property
    def _stats(self) -> collectors.StatsCollector:
        # Holds the previous CPU sample of each pod and container: usage_nano_cores is a rate.
        return collectors.StatsCollector()

    def _forget_gone(self) -> None:
        sandboxes, containers = self._managers()
        self._stats.forget_except([s.id for s in sandboxes.all()] + [c.id for c in containers.all()])

    @staticmethod
    def _fill_psi(target: pb.PsiStats, psi: collectors.Psi | None) -> None:
        if psi is None:
            return
        for line, data in ((target.Some, psi.some), (target.Full, psi.full)):
            if data is not None:
                # The kernel counts stall time in microseconds; CRI (as kubelet's summary API) in ns.
                line.Total = data.total_us * 1000
                line.Avg10, line.Avg60, line.Avg300 = data.avg10, data.avg60, data.avg300

    @classmethod
    def _fill_cpu(cls, target: pb.CpuUsage, cpu: collectors.Cpu) -> None:
        if cpu.usage_ns is not None:
            target.usage_core_nano_seconds.value = cpu.usage_ns
        if cpu.nano_cores is not None:
            target.usage_nano_cores.value = cpu.nano_cores
        cls._fill_psi(target.psi, cpu.psi)

    @classmethod
    def _fill_memory(cls, target: pb.MemoryUsage, memory: collectors.Memory) -> None:
        cls._fill_psi(target.psi, memory.psi)
        for field_name, value in (
            ("working_set_bytes", memory.working_set),
            ("available_bytes", memory.available),
            ("usage_bytes", memory.usage),
            ("rss_bytes", memory.rss),
            ("page_faults", memory.page_faults),
            ("major_page_faults", memory.major_page_faults),
        ):
            if value is not None:
                getattr(target, field_name).value = value

    def _container_stats(self, usage: collectors.ContainerUsage) -> pb.ContainerStats:
        container, now = usage.container, usage.timestamp_ns
        out = pb.ContainerStats(
            attributes=pb.ContainerAttributes(
                id=container.id,
                metadata=pb.ContainerMetadata(name=container.name, attempt=container.attempt),
                labels=container.labels,
                annotations=container.annotations,
            )
        )
        out.cpu.timestamp = now
        out.memory.timestamp = now
        if usage.cgroup is not None:
            self._fill_cpu(out.cpu, usage.cgroup.cpu)
            self._fill_memory(out.memory, usage.cgroup.memory)
            if usage.cgroup.io_psi is not None:
                out.io.timestamp = now
                self._fill_psi(out.io.psi, usage.cgroup.io_psi)
            swap = usage.cgroup.swap
            if swap is not None:
                out.swap.timestamp = now
                out.swap.swap_usage_bytes.value = swap.usage
                if swap.available is not None:
                    out.swap.swap_available_bytes.value = swap.available
        layer = usage.writable_layer
        if layer is not None:
            out.writable_layer.timestamp = now
            out.writable_layer.fs_id.mountpoint = layer.mountpoint
            out.writable_layer.used_bytes.value = layer.used_bytes
            out.writable_layer.inodes_used.value = layer.inodes_used
        return out

    def _pod_stats(self, usage: collectors.PodUsage) -> pb.PodSandboxStats:
        sandbox, now = usage.sandbox, usage.timestamp_ns
        out = pb.PodSandboxStats(
            attributes=pb.PodSandboxAttributes(
                id=sandbox.id,
                metadata=sandbox_metadata(sandbox),
                labels=sandbox.labels,
                annotations=sandbox.annotations,
            )
        )
        linux = out.linux
        if usage.cgroup is not None:
            linux.cpu.timestamp = now
            self._fill_cpu(linux.cpu, usage.cgroup.cpu)
            linux.memory.timestamp = now
            self._fill_memory(linux.memory, usage.cgroup.memory)
            linux.process.timestamp = now
            linux.process.process_count.value = usage.cgroup.processes.processes
            if usage.cgroup.io_psi is not None:
                linux.io.timestamp = now
                self._fill_psi(linux.io.psi, usage.cgroup.io_psi)
        if usage.network is not None:
            linux.network.timestamp = now

            def interface(counters: collectors.Interface) -> pb.NetworkInterfaceUsage:
                found = pb.NetworkInterfaceUsage(name=counters.name)
                found.rx_bytes.value = counters.rx_bytes
                found.rx_errors.value = counters.rx_errors
                found.tx_bytes.value = counters.tx_bytes
                found.tx_errors.value = counters.tx_errors
                return found

            if usage.network.default is not None:
                linux.network.default_interface.CopyFrom(interface(usage.network.default))
            linux.network.interfaces.extend(interface(i) for i in usage.network.interfaces)
        linux.containers.extend(self._container_stats(c) for c in usage.containers)
        return out

    async def ContainerStats(
        self, request: pb.ContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContainerStatsResponse:
        sandboxes, containers = self._managers()
        container = containers.get(request.container_id)
        pair = (sandboxes.find(container.pod_id), container)
        [usage] = await _in_thread(self._stats.containers, [pair])
        return pb.ContainerStatsResponse(stats=self._container_stats(usage))

    async def ListContainerStats(
        self, request: pb.ListContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContainerStatsResponse:
        sandboxes, containers = self._managers()
        wanted = request.filter if request.HasField("filter") else None
        chosen = [(sandboxes.find(c.pod_id), c) for c in containers.all() if _container_matches(c, wanted)]
        usages = await _in_thread(self._stats.containers, chosen)
        self._forget_gone()
        return pb.ListContainerStatsResponse(stats=[self._container_stats(u) for u in usages])

    async def PodSandboxStats(
        self, request: pb.PodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PodSandboxStatsResponse:
        sandboxes, containers = self._managers()
        sandbox = sandboxes.get(request.pod_sandbox_id)
        [usage] = await _in_thread(self._stats.pods, [(sandbox, containers.in_pod(sandbox.id))])
        return pb.PodSandboxStatsResponse(stats=self._pod_stats(usage))

    async def ListPodSandboxStats(
        self, request: pb.ListPodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPodSandboxStatsResponse:
        sandboxes, containers = self._managers()
        wanted = request.filter if request.HasField("filter") else None
        chosen = [
            (s, containers.in_pod(s.id))
            for s in sandboxes.all()
            if wanted is None
            or (s.id.startswith(wanted.id) and _labels_match(s.labels, wanted.label_selector))
        ]
        usages = await _in_thread(self._stats.pods, chosen)
        self._forget_gone()
        return pb.ListPodSandboxStatsResponse(stats=[self._pod_stats(u) for u in usages])

    # --- the list-streaming RPCs: the same answers as the List calls, in pages ----------------

    async def StreamPodSandboxes(
        self, request: pb.StreamPodSandboxesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamPodSandboxesResponse]:
        listed = await self.ListPodSandbox(pb.ListPodSandboxRequest(filter=_filter_of(request)), context)
        for page in _pages(listed.items):
            yield pb.StreamPodSandboxesResponse(pod_sandboxes=page)

    async def StreamContainers(
        self, request: pb.StreamContainersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamContainersResponse]:
        listed = await self.ListContainers(pb.ListContainersRequest(filter=_filter_of(request)), context)
        for page in _pages(listed.containers):
            yield pb.StreamContainersResponse(containers=page)

    async def StreamContainerStats(
        self, request: pb.StreamContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamContainerStatsResponse]:
        listed = await self.ListContainerStats(
            pb.ListContainerStatsRequest(filter=_filter_of(request)), context
        )
        for page in _pages(listed.stats):
            yield pb.StreamContainerStatsResponse(container_stats=page)

    async def StreamPodSandboxStats(
        self, request: pb.StreamPodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamPodSandboxStatsResponse]:
        listed = await self.ListPodSandboxStats(
            pb.ListPodSandboxStatsRequest(filter=_filter_of(request)), context
        )
        for page in _pages(listed.stats):
            yield pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=page)

    async def StreamPodSandboxMetrics(
        self, request: pb.StreamPodSandboxMetricsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamPodSandboxMetricsResponse]:
        listed = await self.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(), context)
        for page in _pages(listed.pod_metrics):
            yield pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=page)

    async def ListMetricDescriptors(
        self, request: pb.ListMetricDescriptorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMetricDescriptorsResponse:
        descriptors = [
            pb.MetricDescriptor(name=d.name, help=d.help, label_keys=d.label_keys)
            for d in cadvisor.DESCRIPTORS
        ]
        return pb.ListMetricDescriptorsResponse(descriptors=descriptors)

    async def ListPodSandboxMetrics(
        self, request: pb.ListPodSandboxMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPodSandboxMetricsResponse:
        sandboxes, containers = self._managers()
        ready = [(s, containers.in_pod(s.id)) for s in sandboxes.all() if s.state == "ready"]
        usages = await _in_thread(self._stats.pods, ready)
        self._forget_gone()

        def metric(value: cadvisor.MetricValue) -> pb.Metric:
            return pb.Metric(
                name=value.name,
                timestamp=value.timestamp_ns,
                metric_type=self._METRIC_TYPES[value.kind],
                label_values=value.label_values,
                value=pb.UInt64Value(value=value.value),
            )

        pods = []
        for usage in usages:
            found = cadvisor.pod_metrics(usage)
            pods.append(
                pb.PodSandboxMetrics(
                    pod_sandbox_id=found.pod_id,
                    metrics=[metric(m) for m in found.metrics],
                    container_metrics=[
                        pb.ContainerMetrics(container_id=cid, metrics=[metric(m) for m in values])
                        for cid, values in found.containers
                    ],
                )
            )
        return pb.ListPodSandboxMetricsResponse(pod_metrics=pods)

    async def ReopenContainerLog(
        self, request: pb.ReopenContainerLogRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReopenContainerLogResponse:
        await _in_thread(self._pods().reopen_container_log, request.container_id)
        return pb.ReopenContainerLogResponse()

    # --- events ---------------------------------------------------------------------------

    async def GetContainerEvents(
        self, request: pb.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ContainerEventResponse]:
        sandboxes, containers = self._managers()
        subscription = containers.events.subscribe(asyncio.get_running_loop())
        try:
            while True:
                event = await subscription.next()
                yield self._event_response(sandboxes, containers, event)
        finally:
            containers.events.unsubscribe(subscription)

    @staticmethod
    def _event_response(
        sandboxes: SandboxManager, containers: ContainerManager, event: ContainerEvent
    ) -> pb.ContainerEventResponse:
        """The event with its pod's status and its containers' statuses: the container as it
        was at the event, its siblings as they are now."""
        container = event.container
        response = pb.ContainerEventResponse(
            container_id=container.id,
            container_event_type=_EVENT_TYPES[event.kind],  # type: ignore[arg-type]
            created_at=event.at_ns,
        )
        sandbox = sandboxes.find(container.pod_id)
        if sandbox is not None:
            response.pod_sandbox_status.CopyFrom(sandbox_status(sandbox))
        siblings = [c for c in containers.in_pod(container.pod_id) if c.id != container.id]
        if event.kind != "deleted":
            siblings.append(container)
        response.containers_statuses.extend(container_status(c) for c in siblings)
        return response

    # --- streaming ------------------------------------------------------------------------

    def _streaming(self) -> StreamingServer:
        if self.streaming is None:
            raise FailedPrecondition("pycri's streaming server is not running")
        return self.streaming

    async def Exec(self, request: pb.ExecRequest, context: grpc.aio.ServicerContext) -> pb.ExecResponse:
        options = check_streams(request.stdin, request.stdout, request.stderr, request.tty)
        url = self._streaming().exec_url(request.container_id, list(request.cmd), options)
        return pb.ExecResponse(url=url)

    async def Attach(self, request: pb.AttachRequest, context: grpc.aio.ServicerContext) -> pb.AttachResponse:
        options = check_streams(request.stdin, request.stdout, request.stderr, request.tty)
        return pb.AttachResponse(url=self._streaming().attach_url(request.container_id, options))

    async def PortForward(
        self, request: pb.PortForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.PortForwardResponse:
        url = self._streaming().portforward_url(request.pod_sandbox_id, list(request.port))
        return pb.PortForwardResponse(url=url)


# Items per message of the list-streaming RPCs: a node with hundreds of pods is never one message.
STREAM_PAGE = 100


def _pages(items: Any) -> list[list[Any]]:
    listed = list(items)
    return [listed[start : start + STREAM_PAGE] for start in range(0, len(listed), STREAM_PAGE)]


def _filter_of(request: Any) -> Any:
    """A Stream request's filter for the matching List request (None when the caller set none)."""
    return request.filter if request.HasField("filter") else None


def _unimplemented(name: str, streaming: bool) -> Any:
    message = f"{name} is not implemented by pycri yet"

    if streaming:

        async def stream_handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            yield  # pragma: no cover - makes this an async generator

        return stream_handler

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handler


def _fill_unimplemented() -> None:
    service = pb.DESCRIPTOR.services_by_name["RuntimeService"]
    for method in service.methods:
        if method.name not in RuntimeService.__dict__:
            setattr(RuntimeService, method.name, _unimplemented(method.name, method.server_streaming))


_fill_unimplemented()
