"""Pods with a user namespace of their own (KEP-127), end to end with crun and runc: the mapping
kubelet sends, the pod's namespaces owned by it, idmapped layers, cleanup; bad modes refused."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon import check
from cri_runtime.daemon.config import Config
from cri_runtime.host import idmap
from cri_runtime.host.mounts import mounts_under
from tests.support.pods import Env, container_pid, exec_out
from tests.support.wait import wait_for

pytestmark = pytest.mark.root

HOST_BASE = 1000000
SIZE = 65536
NS_GET_USERNS = 0xB701


SEARCHABLE_BASE = Path("/var/tmp/pycri-userns-tests")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """pytest's own tmp_path, for every fixture of these tests (the daemon's root and state too),
    replaced by one that others can search: the pod's root (host ID 1000000) must walk to its root
    file system. pytest's directories are 0700, and any pytest session starting on this host
    (other test runs) sets /tmp/pytest-of-root back to 0700."""
    SEARCHABLE_BASE.mkdir(mode=0o711, exist_ok=True)
    SEARCHABLE_BASE.chmod(0o711)
    directory = Path(tempfile.mkdtemp(dir=SEARCHABLE_BASE))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _userns_options(mode: int = pb.NamespaceMode.POD) -> pb.UserNamespace:
    options = pb.UserNamespace(mode=mode)  # type: ignore[arg-type]
    if mode == pb.NamespaceMode.POD:
        mapping = pb.IDMapping(container_id=0, host_id=HOST_BASE, length=SIZE)
        options.uids.append(mapping)
        options.gids.append(mapping)
    return options


def _userns_pod(env: Env, name: str) -> tuple[str, pb.PodSandboxConfig]:
    config = env.cri.pod_config(name, log_directory=str(env.logs / name))
    config.linux.security_context.namespace_options.userns_options.CopyFrom(_userns_options())
    config.linux.security_context.namespace_options.pid = pb.NamespaceMode.POD  # catatonit in it too
    pod = env.cri.run_pod(name, config=config)
    env.pods.append(pod)
    return pod, config


def _run(env: Env, pod: str, sandbox: pb.PodSandboxConfig, name: str, args: list[str]) -> str:
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=env.image),
        command=args,
        log_path=f"{name}.log",
    )
    config.linux.security_context.namespace_options.CopyFrom(sandbox.linux.security_context.namespace_options)
    cid = env.cri.create_container(pod, name, env.image, config=config, sandbox_config=sandbox)
    env.cri.start_container(cid)
    return cid


def _owner(namespace: str) -> int:
    """The inode of the user namespace owning ``namespace`` (ioctl NS_GET_USERNS)."""
    fd = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    finally:
        os.close(fd)
    try:
        return os.fstat(owner).st_ino
    finally:
        os.close(owner)


def _refused(call: Callable[[], object], word: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert word in (caught.value.details() or "")


def test_status_advertises_user_namespaces_per_handler(env: Env) -> None:
    handlers = env.cri.runtime.Status(pb.StatusRequest(), timeout=30).runtime_handlers
    assert handlers and all(h.features.user_namespaces for h in handlers)


def test_pod_user_namespace_maps_root_and_idmaps_the_root_file_system(env: Env) -> None:
    pod, sandbox = _userns_pod(env, "userns")
    first = _run(env, pod, sandbox, "first", ["sh", "-c", "echo made > /made-inside; sleep 100"])
    second = _run(env, pod, sandbox, "second", ["sleep", "100"])

    assert exec_out(env.cri, first, "id", "-u").strip() == "0"
    assert exec_out(env.cri, first, "cat", "/proc/self/uid_map").split() == ["0", str(HOST_BASE), str(SIZE)]
    assert exec_out(env.cri, first, "cat", "/proc/self/gid_map").split() == ["0", str(HOST_BASE), str(SIZE)]
    # Files of the image (root's on disk) are root's inside, through the idmapped layers.
    assert exec_out(env.cri, first, "stat", "-c", "%u:%g", "/bin/busybox").strip() == "0:0"
    pid = container_pid(env.cri, first)
    # Seen from the host, the container's root is host ID 1000000, and so are its files.
    assert os.stat(f"/proc/{pid}").st_uid == HOST_BASE
    assert os.stat(f"/proc/{pid}/root/bin/busybox").st_uid == HOST_BASE
    # What the container wrote is root's inside and host ID 1000000's in its upper directory.
    made = env.daemon.root / "containers" / first / "upper" / "made-inside"
    assert wait_for(lambda: made.exists() and made.read_text() == "made\n")  # the shell may be slow
    assert exec_out(env.cri, first, "stat", "-c", "%u", "/made-inside").strip() == "0"
    assert made.read_text() == "made\n" and made.stat().st_uid == HOST_BASE
    assert os.stat(f"/proc/{pid}/root/made-inside").st_uid == HOST_BASE
    # The two containers share the pod's user (and network) namespaces.
    other = container_pid(env.cri, second)
    assert os.readlink(f"/proc/{pid}/ns/user") == os.readlink(f"/proc/{other}/ns/user")
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/proc/{other}/ns/net")
    # The pod's init (catatonit, PID 1 of the shared PID namespace) runs as the pod's root.
    assert exec_out(env.cri, first, "cat", "/proc/1/cmdline").startswith("/usr/bin/catatonit")
    assert exec_out(env.cri, first, "stat", "-c", "%u", "/proc/1").strip() == "0"
    # The pod's network, IPC and UTS namespaces are owned by its user namespace.
    for kind in ("net", "ipc", "uts"):
        assert _owner(f"/proc/{pid}/ns/{kind}") == os.stat(f"/proc/{pid}/ns/user").st_ino
    status = env.cri.pod_status(pod).status
    userns = status.linux.namespaces.options.userns_options
    assert userns.mode == pb.NamespaceMode.POD
    assert [(m.container_id, m.host_id, m.length) for m in userns.uids] == [(0, HOST_BASE, SIZE)]

    env.cri.stop_pod(pod)
    env.cri.remove_pod(pod)
    env.pods.remove(pod)
    assert mounts_under(env.daemon.workdir) == []


@pytest.mark.parametrize("mode", [pb.NamespaceMode.CONTAINER, pb.NamespaceMode.TARGET])
def test_container_and_target_modes_are_refused(env: Env, mode: int) -> None:
    config = env.cri.pod_config("badmode")
    config.linux.security_context.namespace_options.userns_options.CopyFrom(_userns_options(mode))
    _refused(lambda: env.cri.run_pod("badmode", config=config), "userns_options")
    assert env.cri.list_pods() == []


@pytest.mark.parametrize(
    "mappings",
    [
        [(0, HOST_BASE, SIZE), (0, 2 * HOST_BASE, SIZE)],  # more than one
        [(1, HOST_BASE, SIZE)],  # container ID 0 not mapped
        [],  # none
    ],
)
def test_bad_mappings_are_refused(env: Env, mappings: list[tuple[int, int, int]]) -> None:
    config = env.cri.pod_config("badmap")
    options = config.linux.security_context.namespace_options.userns_options
    options.mode = pb.NamespaceMode.POD
    for inside, outside, length in mappings:
        options.uids.append(pb.IDMapping(container_id=inside, host_id=outside, length=length))
        options.gids.append(pb.IDMapping(container_id=inside, host_id=outside, length=length))
    _refused(lambda: env.cri.run_pod("badmap", config=config), "userns_options")
    assert env.cri.list_pods() == []
    assert mounts_under(env.daemon.workdir) == []


def test_a_restarted_daemon_keeps_the_pods_user_namespace(env: Env) -> None:
    pod, sandbox = _userns_pod(env, "survivor")
    before = _run(env, pod, sandbox, "before", ["sleep", "100"])
    userns = os.readlink(f"/proc/{container_pid(env.cri, before)}/ns/user")
    env.cri.close()
    env.daemon.stop()
    env.daemon.start()
    env.cri = env.daemon.client()
    assert env.cri.pod_status(pod).status.state == pb.PodSandboxState.SANDBOX_READY
    after = _run(env, pod, sandbox, "after", ["sleep", "100"])
    assert os.readlink(f"/proc/{container_pid(env.cri, after)}/ns/user") == userns
    assert exec_out(env.cri, after, "cat", "/proc/self/uid_map").split() == ["0", str(HOST_BASE), str(SIZE)]


def test_check_says_whether_the_root_can_be_idmapped(tmp_path: Path) -> None:
    assert idmap.can_idmap(tmp_path) == ""
    # procfs takes no idmapped mounts: the reason names the call that refused.
    assert "mount_setattr" in idmap.can_idmap(Path("/proc"))
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    config = Config(root=str(closed / "root"), state=str(tmp_path / "state"))
    [finding] = check.check_user_namespaces(config)
    assert finding.level == check.WARN and f"chmod o+x {closed}" in finding.fix
    config = Config(root=str(tmp_path / "root"), state=str(tmp_path / "state"))
    [finding] = check.check_user_namespaces(config)
    assert finding.level == check.OK


def test_volumes_are_idmapped_and_written_with_host_ids(env: Env, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o755)  # root's, not writable by others: only the pod's root may write
    (volume / "from-host").write_text("host\n")
    pod, sandbox = _userns_pod(env, "volumes")
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="writer"),
        image=pb.ImageSpec(image=env.image),
        command=["sh", "-c", "echo inside > /data/from-pod; sleep 100"],
        log_path="writer.log",
        mounts=[pb.Mount(container_path="/data", host_path=str(volume))],
    )
    config.linux.security_context.namespace_options.CopyFrom(sandbox.linux.security_context.namespace_options)
    cid = env.cri.create_container(pod, "writer", env.image, config=config, sandbox_config=sandbox)
    env.cri.start_container(cid)
    assert exec_out(env.cri, cid, "stat", "-c", "%u:%g", "/data", "/data/from-host").split() == ["0:0", "0:0"]
    made = volume / "from-pod"
    assert wait_for(lambda: made.exists() and made.read_text() == "inside\n")  # the shell may be slow
    assert exec_out(env.cri, cid, "cat", "/data/from-pod") == "inside\n"
    # Through the idmapped mount, the pod's root writes as the host's root: on disk, root's.
    assert made.read_text() == "inside\n" and made.stat().st_uid == 0
    assert (volume / "from-host").stat().st_uid == 0  # nothing chowned
    env.cri.stop_pod(pod)
    env.cri.remove_pod(pod)
    env.pods.remove(pod)
    assert mounts_under(env.daemon.workdir) == []


def _crash_and_restart(env: Env, point: str, call: Callable[[], object]) -> None:
    """Restart pycri with ``point`` armed, make ``call`` reach it (pycri dies with SIGKILL), start
    again disarmed: the start-up sweep must take away whatever the call had made."""
    env.cri.close()
    env.daemon.stop()
    env.daemon.env = {"PYCRI_FAILPOINTS": point}
    env.daemon.start()
    env.cri = env.daemon.client()
    with pytest.raises(grpc.RpcError) as failure:
        call()
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
    env.daemon.wait_killed()
    env.cri.close()
    env.daemon.env = {}
    env.daemon.start()
    env.cri = env.daemon.client()


@pytest.mark.parametrize("point", ["sandbox.after_init", "sandbox.after_cni"])
def test_a_crash_while_making_a_userns_pod_leaves_nothing(env: Env, point: str) -> None:
    config = env.cri.pod_config("crashing", log_directory=str(env.logs / "crashing"))
    config.linux.security_context.namespace_options.userns_options.CopyFrom(_userns_options())
    config.linux.security_context.namespace_options.pid = pb.NamespaceMode.POD
    _crash_and_restart(env, point, lambda: env.cri.run_pod("crashing", config=config))
    assert env.cri.list_pods() == []
    assert mounts_under(env.daemon.workdir) == []


def test_a_crash_while_making_a_userns_container_leaves_nothing(env: Env) -> None:
    pod, sandbox = _userns_pod(env, "crashing")
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="half"),
        image=pb.ImageSpec(image=env.image),
        command=["sleep", "100"],
    )
    config.linux.security_context.namespace_options.CopyFrom(sandbox.linux.security_context.namespace_options)
    _crash_and_restart(
        env,
        "container.after_mount",
        lambda: env.cri.create_container(pod, "half", env.image, config=config, sandbox_config=sandbox),
    )
    assert env.cri.list_containers() == []
    # The pod's pins (under sandboxes/) stay; the idmapped layers and the overlay are gone.
    assert not any("idmap" in m or "/containers/" in m for m in mounts_under(env.daemon.workdir))


def test_a_root_the_pods_root_cannot_walk_to_is_failed_precondition(env: Env, tmp_path: Path) -> None:
    config = env.cri.pod_config("closed")
    config.linux.security_context.namespace_options.userns_options.CopyFrom(_userns_options())
    mode = tmp_path.stat().st_mode & 0o7777
    tmp_path.chmod(0o700)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            env.cri.run_pod("closed", config=config)
    finally:
        tmp_path.chmod(mode)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"chmod o+x {tmp_path}" in (caught.value.details() or "")
    assert env.cri.list_pods() == []
