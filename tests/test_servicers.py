"""The servicers' validation paths, in process: real RuntimeService and ImageService over real
managers in a temporary directory, served by pytest-grpc's server through tests/support/inprocess.py.
No daemon, and no kernel work: each request here is refused before a namespace, mount or cgroup is
made, and each test checks the status code, its message, and that nothing was made.

The runtime is wired as ``daemon.server.build_runtime`` wires it, without its ``recover`` step:
the start-up sweep removes cgroups under pycri's default parent that its own records do not know,
which would be other daemons' pods on a shared host. Two records stand in for what a previous run
left: a ready pod (for CreateContainer) and an exited container in it (for the container RPCs that
validate a live object).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri_runtime import __version__
from cri_runtime.api import api_pb2 as pb
from cri_runtime.api import api_pb2_grpc as pb_grpc
from cri_runtime.cri import convert
from cri_runtime.cri import runtime_service as runtime_service_module
from cri_runtime.cri.runtime_service import RuntimeService
from cri_runtime.daemon.config import Config, NetworkConfig
from cri_runtime.network.cni import CNI
from cri_runtime.oci import runtimes as oci_runtimes
from cri_runtime.oci.conmon import Executor
from cri_runtime.runtime.containers import ContainerManager, ContainerSettings
from cri_runtime.runtime.pods import Pods
from cri_runtime.runtime.sandboxes import SandboxManager, SandboxSettings
from cri_runtime.runtime.state import Container, Sandbox, StateDB
from imageservice.service import ImageService
from imageservice.store import ImageStore
from tests.support.inprocess import EventLoopThread, sync_servicer

C = grpc.StatusCode
POD_ID = "a" * 64
CONTAINER_ID = "c" * 64
RUNNING_ID = "d" * 64
NOT_READY_POD_ID = "b" * 64
UNKNOWN_ID = "f" * 64


@dataclass
class World:
    root: Path
    state: Path
    db: StateDB
    pods: Pods
    store: ImageStore
    runtime: object  # the bridged RuntimeServiceServicer
    images: object  # the bridged ImageServiceServicer
    service: RuntimeService  # unbridged, for the streaming RPCs


def _pod_record(pod_id: str, name: str, state: str, directory: Path) -> Sandbox:
    config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, uid=name, namespace="default"))
    return Sandbox(
        id=pod_id,
        name=name,
        namespace="default",
        uid=name,
        attempt=0,
        labels={},
        annotations={},
        runtime_handler="",
        created_at_ns=time.time_ns(),
        config=convert.pod_sandbox_config(config),
        state=state,  # type: ignore[arg-type]
        dir=str(directory),
    )


def _container_record(container_id: str, name: str, state: str, pod_id: str, state_dir: Path) -> Container:
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image="busybox"))
    return Container(
        id=container_id,
        pod_id=pod_id,
        name=name,
        attempt=0,
        labels={},
        annotations={},
        image="busybox",
        image_id="sha256:" + "0" * 64,
        image_ref="sha256:" + "0" * 64,
        created_at_ns=time.time_ns(),
        config=convert.container_config(config),
        log_path="",
        runtime="runc",
        state=state,  # type: ignore[arg-type]
        run_dir=str(state_dir / "containers" / container_id),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("servicers")
    (base / "net.d").mkdir()
    config = Config(
        socket=str(base / "pycri.sock"),
        root=str(base / "root"),
        state=str(base / "state"),
        network=NetworkConfig(conf_dir=str(base / "net.d"), bin_dirs=(str(base / "cni-bin"),)),
    )
    root, state = Path(config.root), Path(config.state)
    runtimes = oci_runtimes.detect()
    default, why = oci_runtimes.choose_default(config.default_runtime, runtimes)
    store = ImageStore(root, config.image)
    db = StateDB(root / "runtime.db")
    cni = CNI(Path(config.network.conf_dir), [Path(d) for d in config.network.bin_dirs], state / "cni")
    usable = {name: info for name, info in runtimes.items() if info.usable}
    executors = {name: Executor(name, info.path, state / "exec") for name, info in usable.items()}
    default_name = default.name if default else ""
    sandboxes = SandboxManager(SandboxSettings(state / "sandboxes", default_name, tuple(usable)), db, cni)
    containers = ContainerManager(
        ContainerSettings(root / "containers", state / "containers", None), db, store, executors, default_name
    )
    pods = Pods(sandboxes, containers)
    ready = _pod_record(POD_ID, "kept", "ready", base / "kept-pod")
    not_ready = _pod_record(NOT_READY_POD_ID, "stopped", "notready", base / "stopped-pod")
    # In memory only, as the managers take a previous run's records (without Pods.restore's
    # reconciling with the OCI runtime, which would look for these containers' exits): the DB
    # stays empty, so that any row in it afterwards is one a refused request wrote.
    records = [
        _container_record(CONTAINER_ID, "done", "exited", POD_ID, state),
        # Running on record only, with no process: no test gets past the checks made before one.
        _container_record(RUNNING_ID, "busy", "running", POD_ID, state),
    ]
    sandboxes.restore([ready, not_ready])
    containers.restore(records, {POD_ID: ready})
    loop = EventLoopThread()
    runtime_service = RuntimeService(config, runtimes, default, why, pods, cni)
    image_service = ImageService(store)
    yield World(
        root=root,
        state=state,
        db=db,
        pods=pods,
        store=store,
        runtime=sync_servicer("RuntimeService", pb_grpc.RuntimeServiceServicer, runtime_service, loop),
        images=sync_servicer("ImageService", pb_grpc.ImageServiceServicer, image_service, loop),
        service=runtime_service,
    )
    loop.close()
    image_service.close()
    containers.close()
    store.close()
    db.close()


# --- pytest-grpc ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_servicer(world: World) -> World:
    return world


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Callable[[World, grpc.Server], None]:
    def add(served: World, server: grpc.Server) -> None:
        pb_grpc.add_RuntimeServiceServicer_to_server(served.runtime, server)  # type: ignore[arg-type]
        pb_grpc.add_ImageServiceServicer_to_server(served.images, server)  # type: ignore[arg-type]

    return add


@pytest.fixture(scope="module")
def grpc_stub_cls() -> type[pb_grpc.RuntimeServiceStub]:
    return pb_grpc.RuntimeServiceStub


@pytest.fixture(scope="module")
def image_stub(grpc_channel: grpc.Channel) -> pb_grpc.ImageServiceStub:
    return pb_grpc.ImageServiceStub(grpc_channel)


# --- helpers ------------------------------------------------------------------------------------


def refused(rpc: Callable[..., object], request: object) -> tuple[grpc.StatusCode, str]:
    """The code and message of the status ``rpc`` answers ``request`` with; it must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        rpc(request, timeout=10)
    error = caught.value
    assert isinstance(error, grpc.Call)  # a failed unary call is both
    return error.code(), error.details() or ""


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def nothing_made(
    grpc_stub: pb_grpc.RuntimeServiceStub, image_stub: pb_grpc.ImageServiceStub, world: World
) -> Iterator[None]:
    """After the test: the same pods, containers and images as before, no record in the state DB,
    and no new file under pycri's root and state directories."""
    pods = {p.id for p in grpc_stub.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    containers = {c.id for c in grpc_stub.ListContainers(pb.ListContainersRequest()).containers}
    files = (files_under(world.root), files_under(world.state))
    yield
    assert {p.id for p in grpc_stub.ListPodSandbox(pb.ListPodSandboxRequest()).items} == pods
    assert {c.id for c in grpc_stub.ListContainers(pb.ListContainersRequest()).containers} == containers
    assert not image_stub.ListImages(pb.ListImagesRequest()).images
    assert world.db.load() == ([], [])
    assert (files_under(world.root), files_under(world.state)) == files


def pod_config(**changes: object) -> pb.PodSandboxConfig:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", uid="uid-1", namespace="default"),
        log_directory="/var/log/pods/web",
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def container_config(name: str = "app", image: str = "busybox") -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image))


# --- Version --------------------------------------------------------------------------------


def test_version_names_pycri_and_the_v1_api(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    answer = grpc_stub.Version(pb.VersionRequest(version="0.1.0"))
    assert (answer.runtime_name, answer.runtime_version, answer.runtime_api_version) == (
        "pycri",
        __version__,
        "v1",
    )


# --- the list-streaming RPCs ---------------------------------------------------------------------


def _streamed(stream: AsyncIterator[Any]) -> list[Any]:
    async def collect() -> list[Any]:
        return [message async for message in stream]

    return asyncio.run(collect())


def test_stream_rpcs_answer_what_the_list_rpcs_do_in_pages(
    world: World, grpc_stub: pb_grpc.RuntimeServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_service_module, "STREAM_PAGE", 1)
    service = world.service
    pods = _streamed(service.StreamPodSandboxes(pb.StreamPodSandboxesRequest(), None))  # type: ignore[arg-type]
    assert [len(m.pod_sandboxes) for m in pods] == [1, 1]  # one pod a message
    listed = grpc_stub.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert sorted(p.id for m in pods for p in m.pod_sandboxes) == sorted(p.id for p in listed)
    ready = pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.PodSandboxState.SANDBOX_READY))
    only_ready = _streamed(service.StreamPodSandboxes(pb.StreamPodSandboxesRequest(filter=ready), None))  # type: ignore[arg-type]
    assert [p.id for m in only_ready for p in m.pod_sandboxes] == [POD_ID]
    exited = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.ContainerState.CONTAINER_EXITED))
    containers = _streamed(service.StreamContainers(pb.StreamContainersRequest(filter=exited), None))  # type: ignore[arg-type]
    assert [c.id for m in containers for c in m.containers] == [CONTAINER_ID]
    everything = _streamed(service.StreamContainers(pb.StreamContainersRequest(), None))  # type: ignore[arg-type]
    assert [len(m.containers) for m in everything] == [1, 1]
    nothing = pb.ContainerFilter(id=UNKNOWN_ID)
    assert _streamed(service.StreamContainers(pb.StreamContainersRequest(filter=nothing), None)) == []  # type: ignore[arg-type]


# --- RunPodSandbox ------------------------------------------------------------------------------


@pytest.mark.usefixtures("nothing_made")
def test_run_pod_sandbox_without_a_config_is_invalid(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.RunPodSandbox, pb.RunPodSandboxRequest())
    assert code == C.INVALID_ARGUMENT
    assert "metadata.name is empty" in message


@pytest.mark.usefixtures("nothing_made")
@pytest.mark.parametrize("field", ["name", "uid", "namespace"])
def test_run_pod_sandbox_with_an_empty_metadata_field_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub, field: str
) -> None:
    config = pod_config()
    setattr(config.metadata, field, "")
    code, message = refused(grpc_stub.RunPodSandbox, pb.RunPodSandboxRequest(config=config))
    assert code == C.INVALID_ARGUMENT
    assert f"metadata.{field} is empty" in message


@pytest.mark.usefixtures("nothing_made")
def test_run_pod_sandbox_with_a_relative_log_directory_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    config = pod_config(log_directory="relative/logs")
    code, message = refused(grpc_stub.RunPodSandbox, pb.RunPodSandboxRequest(config=config))
    assert code == C.INVALID_ARGUMENT
    assert "'relative/logs' must be an absolute path" in message


@pytest.mark.usefixtures("nothing_made")
def test_run_pod_sandbox_with_an_unknown_runtime_handler_is_not_found(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    request = pb.RunPodSandboxRequest(config=pod_config(), runtime_handler="kata")
    code, message = refused(grpc_stub.RunPodSandbox, request)
    assert code == C.NOT_FOUND
    assert "runtime handler 'kata' is not configured" in message


@pytest.mark.usefixtures("nothing_made")
@pytest.mark.parametrize(
    ("sysctl", "value", "said"),
    [
        ("vm.swappiness", "10", "is not namespaced"),
        ("net.core.somaxconn/../../../vm/swappiness", "10", "is not a name such as"),
        ("kernel.shm_rmid_forced\x00", "1", "is not a name such as"),
        ("net.core.somaxconn", "1\x002", "holds a NUL"),
        ("net.core.somaxconn", "9" * 5000, "exceeds 4096 bytes"),
    ],
)
def test_run_pod_sandbox_with_a_bad_sysctl_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub, sysctl: str, value: str, said: str
) -> None:
    config = pod_config()
    config.linux.sysctls[sysctl] = value
    code, message = refused(grpc_stub.RunPodSandbox, pb.RunPodSandboxRequest(config=config))
    assert code == C.INVALID_ARGUMENT
    assert said in message


@pytest.mark.usefixtures("nothing_made")
def test_run_pod_sandbox_with_an_ipc_sysctl_in_the_nodes_ipc_namespace_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    config = pod_config()
    config.linux.security_context.namespace_options.ipc = pb.NamespaceMode.NODE
    config.linux.sysctls["kernel.shmmni"] = "777"
    code, message = refused(grpc_stub.RunPodSandbox, pb.RunPodSandboxRequest(config=config))
    assert code == C.INVALID_ARGUMENT
    assert "belongs to the ipc namespace, and the pod uses the node's" in message


@pytest.mark.usefixtures("nothing_made")
@pytest.mark.parametrize(
    ("cgroup_parent", "said"),
    [
        ("/kubepods/a\nb", "holds a NUL byte or a newline"),
        ("/kubepods/" + "a" * 300, "longer than 255 bytes"),
        ("/kubepods/../../escape", "climbs out of the hierarchy"),
        ("kubepods/..", "climbs out of the hierarchy"),
    ],
)
def test_run_pod_sandbox_with_a_bad_cgroup_parent_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub, cgroup_parent: str, said: str
) -> None:
    config = pod_config()
    config.linux.cgroup_parent = cgroup_parent
    code, message = refused(grpc_stub.RunPodSandbox, pb.RunPodSandboxRequest(config=config))
    assert code == C.INVALID_ARGUMENT
    assert said in message


@pytest.mark.usefixtures("nothing_made")
def test_run_pod_sandbox_with_an_unknown_port_protocol_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    config = pod_config()
    config.port_mappings.add(protocol=7, container_port=80, host_port=8080)
    code, message = refused(grpc_stub.RunPodSandbox, pb.RunPodSandboxRequest(config=config))
    assert code == C.INVALID_ARGUMENT
    assert "unknown protocol 7" in message


# --- pod lookups --------------------------------------------------------------------------------


def test_pod_sandbox_status_of_an_unknown_pod_is_not_found(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id=UNKNOWN_ID))
    assert code == C.NOT_FOUND
    assert UNKNOWN_ID in message


def test_pod_sandbox_status_without_an_id_is_invalid(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.PodSandboxStatus, pb.PodSandboxStatusRequest())
    assert code == C.INVALID_ARGUMENT
    assert "pod sandbox id is empty" in message


@pytest.mark.usefixtures("nothing_made")
def test_stop_and_remove_of_an_unknown_pod_succeed(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    grpc_stub.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=UNKNOWN_ID))
    grpc_stub.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=UNKNOWN_ID))


def test_stop_pod_sandbox_without_an_id_is_invalid(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.StopPodSandbox, pb.StopPodSandboxRequest())
    assert code == C.INVALID_ARGUMENT
    assert "pod_sandbox_id is empty" in message


# --- CreateContainer ----------------------------------------------------------------------------


@pytest.mark.usefixtures("nothing_made")
def test_create_container_in_an_unknown_pod_is_not_found(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    request = pb.CreateContainerRequest(pod_sandbox_id=UNKNOWN_ID, config=container_config())
    code, message = refused(grpc_stub.CreateContainer, request)
    assert code == C.NOT_FOUND
    assert f"pod sandbox {UNKNOWN_ID!r} not found" in message


@pytest.mark.usefixtures("nothing_made")
def test_create_container_in_a_pod_that_is_not_ready_is_refused(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    request = pb.CreateContainerRequest(pod_sandbox_id=NOT_READY_POD_ID, config=container_config())
    code, message = refused(grpc_stub.CreateContainer, request)
    assert code == C.FAILED_PRECONDITION
    assert "is not ready" in message


@pytest.mark.usefixtures("nothing_made")
@pytest.mark.parametrize(
    ("config", "said"),
    [
        (pb.ContainerConfig(image=pb.ImageSpec(image="busybox")), "metadata.name is empty"),
        (container_config(image=""), "image.image is empty"),
    ],
    ids=["no metadata", "no image"],
)
def test_create_container_without_metadata_or_image_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub, config: pb.ContainerConfig, said: str
) -> None:
    code, message = refused(
        grpc_stub.CreateContainer, pb.CreateContainerRequest(pod_sandbox_id=POD_ID, config=config)
    )
    assert code == C.INVALID_ARGUMENT
    assert said in message


@pytest.mark.usefixtures("nothing_made")
def test_create_container_of_an_image_not_pulled_is_not_found(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    request = pb.CreateContainerRequest(pod_sandbox_id=POD_ID, config=container_config(image="busybox"))
    code, message = refused(grpc_stub.CreateContainer, request)
    assert code == C.NOT_FOUND
    assert "image 'busybox' is not present; pull it first" in message


@pytest.mark.usefixtures("nothing_made")
@pytest.mark.parametrize(
    ("bend", "said"),
    [
        (
            lambda c: c.mounts.add(container_path="/data", host_path="/tmp", propagation=7),
            "propagation 7 is unknown",
        ),
        (
            lambda c: setattr(c.linux.security_context.namespace_options, "pid", 9),
            "pid 9 is not a known mode",
        ),
        (lambda c: setattr(c.linux.security_context.seccomp, "profile_type", 5), "profile_type 5 is unknown"),
    ],
    ids=["mount propagation", "pid namespace mode", "seccomp profile type"],
)
def test_create_container_with_an_unknown_enum_value_is_invalid_before_the_pod_is_looked_up(
    grpc_stub: pb_grpc.RuntimeServiceStub, bend: Callable[[pb.ContainerConfig], object], said: str
) -> None:
    config = container_config()
    bend(config)
    code, message = refused(
        grpc_stub.CreateContainer, pb.CreateContainerRequest(pod_sandbox_id=UNKNOWN_ID, config=config)
    )
    assert code == C.INVALID_ARGUMENT
    assert said in message


# --- container lifecycle on unknown and exited containers -----------------------------------------


def test_start_container_of_an_unknown_id_is_not_found(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.StartContainer, pb.StartContainerRequest(container_id=UNKNOWN_ID))
    assert code == C.NOT_FOUND
    assert f"container {UNKNOWN_ID!r} not found" in message


def test_start_container_that_has_exited_is_refused(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.StartContainer, pb.StartContainerRequest(container_id=CONTAINER_ID))
    assert code == C.FAILED_PRECONDITION
    assert "is exited, not created" in message


@pytest.mark.usefixtures("nothing_made")
def test_stop_and_remove_of_an_unknown_container_succeed(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    grpc_stub.StopContainer(pb.StopContainerRequest(container_id=UNKNOWN_ID, timeout=1))
    grpc_stub.RemoveContainer(pb.RemoveContainerRequest(container_id=UNKNOWN_ID))


@pytest.mark.parametrize(
    ("rpc", "request_cls"),
    [
        ("StopContainer", pb.StopContainerRequest),
        ("RemoveContainer", pb.RemoveContainerRequest),
        ("ContainerStatus", pb.ContainerStatusRequest),
        ("StartContainer", pb.StartContainerRequest),
    ],
)
def test_container_rpcs_without_an_id_are_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub, rpc: str, request_cls: type
) -> None:
    code, message = refused(getattr(grpc_stub, rpc), request_cls())
    assert code == C.INVALID_ARGUMENT
    assert "container" in message and "empty" in message


def test_container_status_of_an_unknown_id_is_not_found(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.ContainerStatus, pb.ContainerStatusRequest(container_id=UNKNOWN_ID))
    assert code == C.NOT_FOUND
    assert UNKNOWN_ID in message


def test_exec_sync_in_an_unknown_container_is_not_found(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(
        grpc_stub.ExecSync, pb.ExecSyncRequest(container_id=UNKNOWN_ID, cmd=["true"], timeout=5)
    )
    assert code == C.NOT_FOUND
    assert UNKNOWN_ID in message


def test_exec_sync_in_an_exited_container_is_refused(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(
        grpc_stub.ExecSync, pb.ExecSyncRequest(container_id=CONTAINER_ID, cmd=["true"], timeout=5)
    )
    assert code == C.FAILED_PRECONDITION
    assert "is exited, not running" in message


def test_exec_sync_without_a_command_is_invalid(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.ExecSync, pb.ExecSyncRequest(container_id=RUNNING_ID, timeout=5))
    assert code == C.INVALID_ARGUMENT
    assert "cmd is empty" in message


def test_exec_without_any_stream_is_invalid(grpc_stub: pb_grpc.RuntimeServiceStub) -> None:
    code, message = refused(grpc_stub.Exec, pb.ExecRequest(container_id=CONTAINER_ID, cmd=["sh"]))
    assert code == C.INVALID_ARGUMENT
    assert "one of stdin, stdout and stderr must be requested" in message


# --- UpdateContainerResources ---------------------------------------------------------------------


def test_update_container_resources_without_linux_resources_is_invalid(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    request = pb.UpdateContainerResourcesRequest(container_id=CONTAINER_ID)
    code, message = refused(grpc_stub.UpdateContainerResources, request)
    assert code == C.INVALID_ARGUMENT
    assert "linux resources are required" in message


def test_update_container_resources_of_an_unknown_container_is_not_found(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    request = pb.UpdateContainerResourcesRequest(
        container_id=UNKNOWN_ID, linux=pb.LinuxContainerResources(cpu_shares=512)
    )
    code, message = refused(grpc_stub.UpdateContainerResources, request)
    assert code == C.NOT_FOUND
    assert UNKNOWN_ID in message


@pytest.mark.usefixtures("nothing_made")
@pytest.mark.parametrize(
    ("resources", "said"),
    [
        (pb.LinuxContainerResources(cpu_shares=1), "cpu_shares 1 must be between 2 and 262144"),
        (pb.LinuxContainerResources(cpu_quota=5), "cpu_quota 5 must be at least"),
        (pb.LinuxContainerResources(cpu_period=2), "cpu_period 2 must be between"),
        (pb.LinuxContainerResources(memory_limit_in_bytes=-5), "memory_limit_in_bytes -5 must be at least"),
        (pb.LinuxContainerResources(memory_swap_limit_in_bytes=1 << 30), "memory_swap_limit_in_bytes"),
        (pb.LinuxContainerResources(oom_score_adj=5000), "oom_score_adj 5000 must be between -1000 and 1000"),
        (pb.LinuxContainerResources(cpuset_cpus="0-a"), "cpuset_cpus '0-a' is not a list"),
        (
            pb.LinuxContainerResources(cpuset_cpus=f"{os.cpu_count() or 1}"),
            "is not a set of this host's CPUs",
        ),
    ],
    ids=[
        "shares",
        "quota",
        "period",
        "negative memory",
        "swap without memory",
        "oom",
        "cpuset",
        "absent cpu",
    ],
)
def test_update_container_resources_with_bad_values_is_invalid_and_changes_nothing(
    grpc_stub: pb_grpc.RuntimeServiceStub, world: World, resources: pb.LinuxContainerResources, said: str
) -> None:
    request = pb.UpdateContainerResourcesRequest(container_id=CONTAINER_ID, linux=resources)
    code, message = refused(grpc_stub.UpdateContainerResources, request)
    assert code == C.INVALID_ARGUMENT
    assert said in message
    assert world.pods.containers.get(CONTAINER_ID).config.resources is None


def test_update_container_resources_of_an_exited_container_is_refused(
    grpc_stub: pb_grpc.RuntimeServiceStub,
) -> None:
    request = pb.UpdateContainerResourcesRequest(
        container_id=CONTAINER_ID, linux=pb.LinuxContainerResources(cpu_shares=512)
    )
    code, message = refused(grpc_stub.UpdateContainerResources, request)
    assert code == C.FAILED_PRECONDITION
    assert "only a live container can be updated" in message


# --- ImageService ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("nothing_made")
@pytest.mark.parametrize(
    ("reference", "said"),
    [
        ("", "image.image is empty"),
        ("Busybox:latest", "invalid repository name 'library/Busybox'"),
        ("busybox:ôî", "invalid tag 'ôî'"),
        ("busybox@sha256:xyz", "invalid digest 'sha256:xyz'"),
        ("a b", "'a b' contains white space"),
    ],
    ids=["empty", "upper case", "non-ASCII tag", "bad digest", "space"],
)
def test_pull_image_of_an_empty_or_malformed_reference_is_invalid(
    image_stub: pb_grpc.ImageServiceStub, reference: str, said: str
) -> None:
    code, message = refused(image_stub.PullImage, pb.PullImageRequest(image=pb.ImageSpec(image=reference)))
    assert code == C.INVALID_ARGUMENT
    assert said in message


def test_image_status_of_an_unknown_image_is_an_empty_answer(image_stub: pb_grpc.ImageServiceStub) -> None:
    answer = image_stub.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image="busybox:1.36")))
    assert not answer.HasField("image")


def test_image_status_without_a_reference_is_invalid(image_stub: pb_grpc.ImageServiceStub) -> None:
    code, message = refused(image_stub.ImageStatus, pb.ImageStatusRequest())
    assert code == C.INVALID_ARGUMENT
    assert "image.image is empty" in message


@pytest.mark.usefixtures("nothing_made")
def test_remove_image_of_an_unknown_image_succeeds(image_stub: pb_grpc.ImageServiceStub) -> None:
    image_stub.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image="busybox:1.36")))


def test_remove_image_without_a_reference_is_invalid(image_stub: pb_grpc.ImageServiceStub) -> None:
    code, message = refused(image_stub.RemoveImage, pb.RemoveImageRequest())
    assert code == C.INVALID_ARGUMENT
    assert "image.image is empty" in message
