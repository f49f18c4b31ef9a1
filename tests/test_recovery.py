"""Crash safety: pycri is killed with SIGKILL at named points inside each RPC (failpoints), then
started again on the same root and state. The half-made object must be finished or taken away,
never left half-alive, and nothing else lost; the host must hold nothing that no record owns."""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from cri_runtime.host.mounts import mounts_under
from tests.support.daemon import Daemon, bridge_ports, force_cleanup
from tests.support.host import catches, parent_pid, process_gone, processes_of
from tests.support.images import Image, busybox_layer, layer_from_files, push_image
from tests.support.pods import container_pid, exec_out, wait_exited
from tests.support.registry import Registry
from tests.support.wait import wait_for

pytestmark = pytest.mark.root

SUBNET_PREFIX = "198.18.102."
# The VM guest runs these tests again under the systemd cgroup driver (vm/guest-test).
CGROUP_DRIVER = os.environ.get("PYCRI_TEST_CGROUP_DRIVER", "cgroupfs")


@dataclass
class Node:
    """One pycri daemon that a test may crash and restart, and what it made on the host."""

    daemon: Daemon
    cri: CRIClient
    image: str
    logs: Path
    bridge: str

    def arm(self, *points: str) -> None:
        """Restart pycri with failpoints armed."""
        self.restart(",".join(points))

    def restart(self, failpoints: str = "") -> None:
        self.cri.close()
        self.daemon.stop()
        self.daemon.env = {"PYCRI_FAILPOINTS": failpoints} if failpoints else {}
        self.daemon.start()
        self.cri = self.daemon.client()

    def crash_on(self, call, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        """Make a call that reaches an armed failpoint: the daemon dies with SIGKILL mid-call."""
        with pytest.raises(grpc.RpcError) as failure:
            call(*args, **kwargs)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
        self.daemon.wait_killed()
        self.cri.close()
        # Start again, disarmed, on the same root and state.
        self.daemon.env = {}
        self.daemon.start()
        self.cri = self.daemon.client()

    def crash_after(self, call, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        """Make a call whose background work reaches an armed failpoint: the call itself may
        answer first. Then start again, disarmed."""
        try:
            call(*args, **kwargs)
        except grpc.RpcError as failure:
            assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure
        self.daemon.wait_killed()
        self.cri.close()
        self.daemon.env = {}
        self.daemon.start()
        self.cri = self.daemon.client()

    def pod(self, name: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
        return self.cri.run_pod(name, log_directory=str(self.logs / name), **kwargs)

    def container(self, pod: str, name: str, args: list[str], start: bool = True) -> str:
        cid = self.cri.create_container(pod, name, self.image, command=args, log_path=f"{name}.log")
        if start:
            self.cri.start_container(cid)
        return cid


def leftovers(node: Node) -> dict[str, object]:
    """What the host holds for this daemon beyond its records' objects (nothing, when empty)."""
    state = node.daemon.state
    ipam = [p.name for p in (state / "cni-ipam").glob("*/*") if _is_ip(p.name)]
    links = bridge_ports(node.bridge)
    return {
        "processes": processes_of(node.daemon.workdir),
        "mounts": mounts_under(node.daemon.workdir),
        "bridge ports": links,
        "cgroups": [
            str(p)
            for pattern in ("*/pycri/*", "pycri/*", "pycri.slice/*")  # v1 or hybrid, v2, systemd
            for p in Path("/sys/fs/cgroup").glob(pattern)
            if _ours(node, p.name.removeprefix("pycri-pod").removesuffix(".slice"))
        ],
        "units": _units(node),
        "ip allocations": ipam,
        "cni records": [p.name for p in (state / "cni").glob("*.json")],
        "pod dirs": [p.name for p in (state / "sandboxes").glob("*")],
        "container dirs": [p.name for p in (state / "containers").glob("*")]
        + [p.name for p in (node.daemon.root / "containers").glob("*")],
        "monitor dirs": [p.name for p in (state / "exec").glob("[0-9a-f]*")],
        "runtime states": [p.name for p in (state / "exec").glob("runtime-*/*")],
    }


def _units(node: Node) -> list[str]:
    """The systemd driver's scopes and pod slices of this daemon's objects."""
    if CGROUP_DRIVER != "systemd":
        return []
    listed = subprocess.run(
        ["systemctl", "list-units", "--all", "--no-legend", "--plain", "pycri-*.scope", "pycri-pod*.slice"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    units = [u for u in listed if u.endswith((".scope", ".slice"))]
    return [u for u in units if _ours(node, u.rsplit("-", 1)[-1].split(".")[0].removeprefix("pod"))]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _ours(node: Node, pod_id: str) -> bool:
    # Pod cgroups are /pycri/<pod id>; a pod id this daemon recorded ever lives in its log.
    return pod_id in node.daemon.log_path.read_text(errors="replace")


CLEAN = {
    "processes": [],
    "mounts": [],
    "bridge ports": [],
    "cgroups": [],
    "units": [],
    "ip allocations": [],
    "cni records": [],
    "pod dirs": [],
    "container dirs": [],
    "monitor dirs": [],
    "runtime states": [],
}


@pytest.fixture(scope="module")
def recovery_image(registry: Registry) -> str:
    extra = layer_from_files([("etc/recovery", "yes\n")])
    image = Image.build([busybox_layer(), extra], cmd=["sh"], env=["PATH=/bin:/usr/bin"])
    push_image(registry, "test/recovery", "1", image)
    return f"{registry.host}/test/recovery:1"


@pytest.fixture
def node(daemon_factory, recovery_image: str, tmp_path: Path) -> Iterator[Node]:  # type: ignore[no-untyped-def]
    bridge = f"pyr{secrets.token_hex(3)}"
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    daemon = daemon_factory(
        f'default_runtime = "runc"\ncgroup_driver = "{CGROUP_DRIVER}"\n[network]\nconf_dir = "{net_dir}"\n'
        f'pod_subnet = "{SUBNET_PREFIX}0/24"\nbridge = "{bridge}"\n',
        name="recovery",
    )
    node = Node(daemon, daemon.client(), recovery_image, tmp_path / "logs", bridge)
    try:
        node.cri.pull(recovery_image)
        yield node
        node.cri.close()
        node.cri = node.daemon.client()
        for pod in node.cri.list_pods():
            node.cri.stop_pod(pod.id)
            node.cri.remove_pod(pod.id)
        for container in node.cri.list_containers():
            node.cri.remove_container(container.id)
        remaining = leftovers(node)
        node.cri.close()
        daemon.stop()
    finally:
        daemon.kill()
        found = leftovers(node)
        force_cleanup(daemon)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    assert remaining == CLEAN
    assert found == CLEAN


def _recorded(node: Node) -> tuple[set[str], set[str]]:
    """The IDs in the state DB, read behind pycri's back."""
    with sqlite3.connect(node.daemon.root / "runtime.db") as conn:
        rows = conn.execute("SELECT kind, id FROM runtime_objects").fetchall()
    return {i for k, i in rows if k == "sandbox"}, {i for k, i in rows if k == "container"}


# --- RunPodSandbox ------------------------------------------------------------------------

CREATE_POINTS = [
    "sandbox.recorded",
    "sandbox.after_netns",
    "sandbox.after_cgroup",
    "sandbox.after_init",
    "sandbox.after_cni",
    "sandbox.after_shm",
]


@pytest.mark.parametrize("point", CREATE_POINTS)
def test_crash_inside_run_pod_sandbox_takes_the_half_made_pod_away(node: Node, point: str) -> None:
    node.arm(point)
    node.crash_on(node.pod, "half", pid_mode=pb.NamespaceMode.POD)
    assert node.cri.list_pods() == []
    assert _recorded(node) == (set(), set())
    assert leftovers(node) == CLEAN
    # The name is free again and the network hands out addresses as before.
    pod = node.pod("half", pid_mode=pb.NamespaceMode.POD)
    status = node.cri.pod_status(pod).status
    assert status.state == pb.PodSandboxState.SANDBOX_READY
    assert status.network.ip.startswith(SUBNET_PREFIX)


# --- StopPodSandbox / RemovePodSandbox ------------------------------------------------------


@pytest.mark.parametrize("point", ["sandbox.stop_recorded", "sandbox.stop_after_cni"])
def test_crash_inside_stop_pod_sandbox_is_finished_at_start(node: Node, point: str) -> None:
    pod = node.pod("stopping", pid_mode=pb.NamespaceMode.POD)
    cid = node.container(pod, "c", ["sleep", "100"])
    node.arm(point)
    node.crash_on(node.cri.stop_pod, pod)
    status = node.cri.pod_status(pod).status
    assert status.state == pb.PodSandboxState.SANDBOX_NOTREADY
    assert node.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_EXITED
    found = leftovers(node)
    # A stopped pod keeps its directory and its container's files until removed; nothing runs,
    # nothing is mounted, no address is held.
    assert (found["processes"], found["bridge ports"], found["ip allocations"]) == ([], [], [])
    assert [m for m in found["mounts"] if "/sandboxes/" in m] == []  # type: ignore[union-attr]
    node.cri.remove_pod(pod)
    assert leftovers(node) == CLEAN


@pytest.mark.parametrize("point", ["sandbox.remove_recorded", "sandbox.remove_after_teardown"])
def test_crash_inside_remove_pod_sandbox_is_finished_at_start(node: Node, point: str) -> None:
    pod = node.pod("removing")
    node.container(pod, "c", ["sleep", "100"])
    node.arm(point)
    node.crash_on(node.cri.remove_pod, pod)
    assert node.cri.list_pods() == []
    assert node.cri.list_containers() == []
    assert _recorded(node) == (set(), set())
    assert leftovers(node) == CLEAN


# --- CreateContainer / StartContainer / StopContainer / RemoveContainer -----------------------


@pytest.mark.parametrize("point", ["container.recorded", "container.after_mount"])
def test_crash_inside_create_container_takes_the_container_away(node: Node, point: str) -> None:
    pod = node.pod("host")
    keeper = node.container(pod, "keeper", ["sleep", "100"])
    ip = node.cri.pod_status(pod).status.network.ip
    node.arm(point)
    node.crash_on(node.container, pod, "half", ["sleep", "100"], start=False)
    assert [c.id for c in node.cri.list_containers()] == [keeper]
    assert _recorded(node) == ({pod}, {keeper})
    assert not (node.logs / "host" / "half.log").exists()
    found = leftovers(node)
    assert found["container dirs"] == [keeper, keeper]
    assert len(found["processes"]) == 1  # the keeper's conmon
    # The pod and its other container are untouched, and the name can be used again.
    assert node.cri.pod_status(pod).status.network.ip == ip
    assert exec_out(node.cri, keeper, "echo", "fine") == "fine\n"
    again = node.container(pod, "half", ["sleep", "100"])
    assert node.cri.container_status(again).status.state == pb.ContainerState.CONTAINER_RUNNING


def test_crash_between_runtime_create_and_start_leaves_a_startable_created_container(node: Node) -> None:
    pod = node.pod("halfstart")
    cid = node.container(pod, "c", ["sleep", "100"], start=False)
    node.arm("container.after_conmon")
    node.crash_on(node.cri.start_container, cid)
    # The runtime's half of the start is undone; the record is as CreateContainer left it.
    assert node.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_CREATED
    found = leftovers(node)
    assert found["processes"] == [] and found["runtime states"] == [] and found["monitor dirs"] == []
    node.cri.start_container(cid)
    assert exec_out(node.cri, cid, "echo", "again") == "again\n"


def test_crash_after_the_runtime_started_the_container_reports_it_running(node: Node) -> None:
    pod = node.pod("starter")
    # The runtime's create already forks the container's process: its start time is at or after this.
    before = time.time_ns()
    cid = node.container(pod, "c", ["sleep", "100"], start=False)
    node.arm("container.after_start")
    node.crash_on(node.cri.start_container, cid)
    status = node.cri.container_status(cid).status
    assert status.state == pb.ContainerState.CONTAINER_RUNNING
    # The start time is the process's own, not the time of the restart.
    assert before - 1_000_000_000 <= status.started_at <= time.time_ns()
    assert exec_out(node.cri, cid, "echo", "up") == "up\n"


def test_exit_during_a_crash_inside_stop_container_reports_the_real_code(node: Node) -> None:
    pod = node.pod("stopper")
    cid = node.container(pod, "c", ["sh", "-c", "trap 'exit 3' TERM; while :; do sleep 0.1; done"])
    pid = container_pid(node.cri, cid)
    assert wait_for(lambda: catches(pid, signal.SIGTERM))  # the trap is set
    node.arm("container.stop_after_kill")
    node.crash_on(node.cri.stop_container, cid, 30)
    status = wait_exited(node.cri, cid)
    assert status.exit_code == 3
    assert status.finished_at > status.started_at > 0


@pytest.mark.parametrize("point", ["container.remove_recorded", "container.remove_after_delete"])
def test_crash_inside_remove_container_is_finished_at_start(node: Node, point: str) -> None:
    pod = node.pod("remover")
    cid = node.container(pod, "c", ["sleep", "100"])
    node.arm(point)
    if point == "container.remove_recorded":
        node.crash_on(node.cri.remove_container, cid)
    else:
        # The files are removed after the call returned (the record went first).
        node.crash_after(node.cri.remove_container, cid)
    assert node.cri.list_containers() == []
    assert _recorded(node) == ({pod}, set())
    found = leftovers(node)
    assert found["container dirs"] == [] and found["processes"] == []
    assert node.cri.pod_status(pod).status.state == pb.PodSandboxState.SANDBOX_READY


# --- PullImage / RemoveImage -------------------------------------------------------------------


def _layer_dirs(node: Node) -> list[str]:
    return sorted(p.name for p in (node.daemon.root / "layers").iterdir())


@pytest.mark.parametrize("point", ["image.after_download", "image.after_layer"])
def test_crash_inside_pull_leaves_no_partial_layer(node: Node, point: str, registry: Registry) -> None:
    other = Image.build([busybox_layer(), layer_from_files([("crash", point)])], cmd=["sh"])
    push_image(registry, "test/recovery-pull", point.replace(".", "-"), other)
    ref = f"{registry.host}/test/recovery-pull:{point.replace('.', '-')}"
    before = _layer_dirs(node)
    node.arm(point)
    node.crash_on(node.cri.pull, ref)
    assert ref not in {t for i in node.cri.list_images() for t in i.repo_tags}
    # Only layers that a recorded image uses remain; the temporary area is empty.
    assert _layer_dirs(node) == before
    assert list((node.daemon.root / "tmp").iterdir()) == []
    node.cri.pull(ref)
    assert ref in {t for i in node.cri.list_images() for t in i.repo_tags}
    node.cri.remove_image(ref)


def test_crash_inside_remove_image_removes_it_and_its_layers(node: Node, registry: Registry) -> None:
    other = Image.build([layer_from_files([("only", "mine")])], cmd=["sh"])
    push_image(registry, "test/recovery-rmi", "1", other)
    ref = f"{registry.host}/test/recovery-rmi:1"
    before = _layer_dirs(node)
    node.cri.pull(ref)
    assert len(_layer_dirs(node)) == len(before) + 1
    node.arm("image.remove_after_record")
    node.crash_on(node.cri.remove_image, ref)
    assert ref not in {t for i in node.cri.list_images() for t in i.repo_tags}
    assert _layer_dirs(node) == before


# --- plain kill -9 between calls ----------------------------------------------------------------


def test_kill_9_between_calls_keeps_every_pod_and_container(node: Node) -> None:
    pod = node.pod("survivor")
    ip = node.cri.pod_status(pod).status.network.ip
    keeper = node.container(pod, "keeper", ["sleep", "100"])
    quitter = node.container(pod, "quitter", ["sh", "-c", "trap 'exit 7' USR1; while :; do sleep 0.1; done"])
    quitter_pid = container_pid(node.cri, quitter)
    assert wait_for(lambda: catches(quitter_pid, signal.SIGUSR1))  # the trap is set
    created = node.container(pod, "created", ["sleep", "100"], start=False)
    before = node.cri.container_status(keeper).status
    node.cri.close()
    node.daemon.kill()
    # The quitter exits while pycri is down; its conmon, its parent, records the exit and ends.
    conmon_pid = parent_pid(quitter_pid)
    os.kill(quitter_pid, signal.SIGUSR1)
    assert wait_for(lambda: process_gone(quitter_pid) and process_gone(conmon_pid))
    exited_by = time.time_ns()
    node.daemon.start()
    node.cri = node.daemon.client()
    after = node.cri.container_status(keeper).status
    assert after.state == pb.ContainerState.CONTAINER_RUNNING
    assert after.started_at == before.started_at
    gone = node.cri.container_status(quitter).status
    assert gone.state == pb.ContainerState.CONTAINER_EXITED
    assert gone.exit_code == 7
    assert gone.started_at < gone.finished_at <= exited_by  # the real exit, not the restart
    assert node.cri.container_status(created).status.state == pb.ContainerState.CONTAINER_CREATED
    node.cri.start_container(created)
    assert exec_out(node.cri, created, "echo", "late") == "late\n"
    assert node.cri.pod_status(pod).status.network.ip == ip


def test_start_collects_what_no_record_owns(node: Node) -> None:
    """A record lost behind pycri's back (the worst case of a crash): its pod and container
    are found by ID and taken down: processes, mounts, netns pins, CNI addresses, cgroups."""
    pod = node.pod("orphan", pid_mode=pb.NamespaceMode.POD)
    node.container(pod, "c", ["sleep", "100"])
    node.cri.close()
    node.daemon.stop()
    with sqlite3.connect(node.daemon.root / "runtime.db") as conn:
        conn.execute("DELETE FROM runtime_objects")
    node.daemon.start()
    node.cri = node.daemon.client()
    assert node.cri.list_pods() == []
    assert leftovers(node) == CLEAN
    assert "collected leftovers of a crashed run" in node.daemon.log_path.read_text()


def test_after_a_reboot_pods_are_not_ready_and_containers_exited(node: Node) -> None:
    """A reboot wipes the state directory (tmpfs), every process and every cgroup; the records
    in the root survive. Pods come back not ready, containers exited, and both can be removed."""
    pod = node.pod("rebooted", pid_mode=pb.NamespaceMode.POD)
    ip = node.cri.pod_status(pod).status.network.ip
    cid = node.container(pod, "c", ["sleep", "100"])
    node.cri.close()
    node.daemon.kill()
    force_cleanup(node.daemon)  # what the reboot takes: processes, mounts, /run, cgroups
    # The bridge lost its port with the netns; host-local's allocations went with /run.
    node.daemon.start()
    node.cri = node.daemon.client()
    status = node.cri.pod_status(pod).status
    assert status.state == pb.PodSandboxState.SANDBOX_NOTREADY
    assert status.network.ip == ip  # as recorded, for kubelet's bookkeeping
    container = node.cri.container_status(cid).status
    assert container.state == pb.ContainerState.CONTAINER_EXITED
    assert container.exit_code == 255 and container.finished_at > 0
    node.cri.remove_pod(pod)
    assert node.cri.list_pods() == [] and node.cri.list_containers() == []
    assert leftovers(node) == CLEAN
