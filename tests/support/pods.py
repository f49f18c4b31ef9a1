"""A pycri daemon with CNI and pulled test image, as the pod tests drive it, and the small helpers
those tests share (waiting for an exit, exec with output, where a pod's or a container's cgroup is)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from cri_runtime.host import cgroups
from cri_runtime.host.mounts import mounts_under
from tests.support.daemon import Daemon, bridge_ports, force_cleanup
from tests.support.host import processes_of
from tests.support.wait import wait_for

# The OCI runtimes the pod tests run with, each on its own daemon and subnet.
RUNTIMES = ["runc", "crun"]


@dataclass
class Env:
    daemon: Daemon
    cri: CRIClient
    image: str
    logs: Path
    subnet_prefix: str
    pods: list[str]

    def pod(self, name: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
        kwargs.setdefault("log_directory", str(self.logs / name))
        pod_id = self.cri.run_pod(name, **kwargs)
        self.pods.append(pod_id)
        return pod_id

    def run(self, pod: str, name: str, args: list[str], **kwargs) -> str:  # type: ignore[no-untyped-def]
        kwargs.setdefault("log_path", f"{name}.log")
        cid = self.cri.create_container(pod, name, self.image, command=args, **kwargs)
        self.cri.start_container(cid)
        return cid


def host_leftovers(daemon: Daemon, bridge: str, pods: list[str]) -> dict[str, object]:
    links = bridge_ports(bridge)
    return {
        "processes": processes_of(daemon.workdir),
        "mounts": mounts_under(daemon.workdir),
        "bridge ports": links,
        "cgroups": [str(path) for pod in pods for path in pod_cgroups_on_host(pod)],
    }


def pod_cgroups_on_host(pod: str) -> list[Path]:
    """Where a pod pycri made without a parent can have a cgroup, on either hierarchy and under
    either driver: cgroup v1 (each controller), cgroup v2 (cgroupfs driver), and the systemd
    driver's ``pycri-pod<id>.slice`` with its scopes."""
    root = Path("/sys/fs/cgroup")
    return [
        *root.glob(f"*/pycri/{pod}"),
        *root.glob(f"pycri/{pod}"),
        *root.glob(f"pycri.slice/pycri-pod{pod}.slice"),
        *root.glob(f"*/pycri.slice/pycri-pod{pod}.slice"),
    ]


def wait_exited(cri: CRIClient, cid: str, timeout: float = 15) -> pb.ContainerStatus:
    def exited() -> pb.ContainerStatus | None:
        status = cri.container_status(cid).status
        return status if status.state == pb.ContainerState.CONTAINER_EXITED else None

    status = wait_for(exited, timeout=timeout)
    assert status is not None, f"container {cid} did not exit in {timeout}s"
    return status


def exec_out(cri: CRIClient, cid: str, *cmd: str) -> str:
    result = cri.exec_sync(cid, list(cmd), timeout=10)
    assert result.exit_code == 0, (cmd, result.stderr)
    return result.stdout.decode()


def container_pid(cri: CRIClient, cid: str) -> int:
    """The host PID of the container's first process, as pycri reports it."""
    return int(json.loads(cri.container_status(cid, verbose=True).info["info"])["pid"])


def pod_cgroup(cri: CRIClient, pod: str) -> str:
    """The pod's cgroup path as pycri records it (for a systemd slice, its place in the tree),
    relative to each hierarchy."""
    return str(json.loads(cri.pod_status(pod, verbose=True).info["info"])["cgroupPath"])


def container_cgroup(cri: CRIClient, pod: str, cid: str) -> str:
    """The container's cgroup path, relative to each hierarchy, from its pod's as pycri records it:
    ``<pod's>/<container id>`` under the cgroupfs driver, ``<pod slice>/pycri-<id>.scope`` under
    the systemd driver (``cgroups.container_path``, what pycri's statistics read)."""
    return cgroups.container_path(pod_cgroup(cri, pod), cid)


def daemon_env(daemon: Daemon, pod_image: str, logs: Path, subnet_prefix: str, bridge: str) -> Iterator[Env]:
    """An ``Env`` over a started ``daemon`` on its own ``bridge``, the test image pulled; afterwards
    its pods removed, the daemon stopped, and the host must hold nothing of it: no process, mount,
    bridge port or cgroup. For a fixture: ``yield from daemon_env(...)``."""
    pods: list[str] = []
    try:
        environment = Env(daemon, daemon.client(), pod_image, logs, subnet_prefix, pods)
        environment.cri.pull(pod_image)
        yield environment
        # A test may have restarted the daemon and replaced the client.
        for pod in environment.cri.list_pods():
            environment.cri.stop_pod(pod.id)
            environment.cri.remove_pod(pod.id)
        environment.cri.close()
        daemon.stop()
    finally:
        daemon.kill()
        leftovers = host_leftovers(daemon, bridge, pods)
        # Judge first, then clean whatever was left, so one failure does not spoil the next test.
        force_cleanup(daemon)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    assert leftovers == {"processes": [], "mounts": [], "bridge ports": [], "cgroups": []}
