"""NRI against a real daemon: plugins on its NRI socket adjust real containers; a plugin that fails,
conflicts, hangs or sends garbage fails or leaves the call as NRI says, and the daemon goes on.

The plugin (tests/support/nri_plugin.py) speaks pycri's own ttrpc code; the Go plugin of critest's
NRI specs is the test of compatibility with containerd/nri.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.config import config_from_dict
from cri_runtime.errors import InvalidArgument
from cri_runtime.nri.api import api_pb2 as nri
from tests.support.daemon import force_cleanup
from tests.support.nri_plugin import NriTestPlugin
from tests.support.pods import Env, daemon_env, exec_out
from tests.support.wait import wait_for


def test_nri_config_names_defaults_and_errors() -> None:
    default = config_from_dict({}).nri
    assert (default.enable, default.socket_path, default.plugin_path, default.plugin_config_path) == (
        False,
        "/var/run/nri/nri.sock",
        "/opt/nri/plugins",
        "/etc/nri/conf.d",
    )
    assert (default.plugin_registration_timeout, default.plugin_request_timeout) == (5.0, 2.0)
    config = config_from_dict({"nri": {"enable": True, "plugin_request_timeout": "500ms"}}).nri
    assert config.enable and config.plugin_request_timeout == 0.5
    for bad, message in (
        ({"bogus": 1}, "unknown keys in [nri]"),
        ({"enable": "yes"}, "nri.enable"),
        ({"plugin_request_timeout": "soon"}, "nri.plugin_request_timeout"),
        ({"plugin_registration_timeout": 0}, "must be positive"),
    ):
        with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
            config_from_dict({"nri": bad})


@pytest.fixture
def nri_env(daemon_factory, pod_image: str, tmp_path: Path) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    bridge = f"pyn{secrets.token_hex(3)}"
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    daemon = daemon_factory(
        f'default_runtime = "runc"\n[network]\nconf_dir = "{net_dir}"\n'
        f'pod_subnet = "198.18.120.0/24"\nbridge = "{bridge}"\n'
        f'[nri]\nenable = true\nsocket_path = "{tmp_path / "nri.sock"}"\n'
        f'plugin_path = "{tmp_path / "plugins"}"\nplugin_config_path = "{tmp_path / "conf.d"}"\n'
        'plugin_request_timeout = "1s"\n',
        name="nri",
    )
    yield from daemon_env(daemon, pod_image, tmp_path / "logs", "198.18.120.", bridge)


def _socket(env: Env) -> Path:
    return env.daemon.workdir.parent / "nri.sock"


def test_plugin_adjusts_env_annotation_and_mount_and_sees_events(nri_env: Env, tmp_path: Path) -> None:
    shared = tmp_path / "from-plugin"
    shared.mkdir()
    (shared / "note").write_text("mounted by NRI\n")
    adjust = nri.ContainerAdjustment(
        env=[nri.KeyValue(key="NRI_SAYS", value="hello")],
        annotations={"nri.test/added": "yes"},
        mounts=[nri.Mount(destination="/mnt/nri", type="bind", source=str(shared), options=["rbind", "ro"])],
    )
    plugin = NriTestPlugin(_socket(nri_env), "adjuster", adjust=adjust).start()
    try:
        pod = nri_env.pod("nripod")
        cid = nri_env.run(pod, "adjusted", ["sleep", "100"])
        assert "NRI_SAYS=hello" in exec_out(nri_env.cri, cid, "env")
        assert exec_out(nri_env.cri, cid, "cat", "/mnt/nri/note") == "mounted by NRI\n"
        status = nri_env.cri.container_status(cid).status
        assert status.annotations["nri.test/added"] == "yes"
        nri_env.cri.stop_container(cid, 1)
        nri_env.cri.remove_container(cid)
        nri_env.cri.stop_pod(pod)
        nri_env.cri.remove_pod(pod)
        expected = [
            ("RunPodSandbox", "nripod"),
            ("CreateContainer", "adjusted"),
            ("PostCreateContainer", "adjusted"),
            ("StartContainer", "adjusted"),
            ("PostStartContainer", "adjusted"),
            ("StopContainer", "adjusted"),
            ("RemoveContainer", "adjusted"),
            ("StopPodSandbox", "nripod"),
            ("RemovePodSandbox", "nripod"),
        ]
        assert plugin.events == expected
    finally:
        plugin.stop()


def test_plugin_adjusts_sysctl_seccomp_and_namespace_entries(nri_env: Env) -> None:
    deny_mkdir = nri.LinuxSeccomp(
        default_action="SCMP_ACT_ALLOW",
        syscalls=[
            nri.LinuxSyscall(
                names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO", errno_ret=nri.OptionalUInt32(value=1)
            )
        ],
    )
    adjust = nri.ContainerAdjustment(
        linux=nri.LinuxContainerAdjustment(
            sysctl={"kernel.shm_rmid_forced": "1"},
            seccomp_policy=deny_mkdir,
            # The container's own UTS namespace instead of the pod's (a new one: no path).
            namespaces=[nri.LinuxNamespace(type="uts")],
        )
    )
    plugin = NriTestPlugin(_socket(nri_env), "linuxadj", adjust=adjust).start()
    try:
        pod = nri_env.pod("linuxadj")
        cid = nri_env.run(pod, "adjusted", ["sleep", "100"])
        assert exec_out(nri_env.cri, cid, "cat", "/proc/sys/kernel/shm_rmid_forced") == "1\n"
        made = nri_env.cri.exec_sync(cid, ["mkdir", "/tmp/denied"], 10)
        assert made.exit_code != 0 and b"Operation not permitted" in made.stderr, made
        spec = json.loads((nri_env.daemon.state / "containers" / cid / "bundle" / "config.json").read_text())
        assert spec["linux"]["sysctl"]["kernel.shm_rmid_forced"] == "1"
        assert spec["linux"]["seccomp"]["syscalls"][0]["names"] == ["mkdir", "mkdirat"]
        assert {"type": "uts"} in spec["linux"]["namespaces"]
    finally:
        plugin.stop()


@pytest.mark.parametrize(
    ("adjust", "words"),
    [
        (
            nri.ContainerAdjustment(
                linux=nri.LinuxContainerAdjustment(
                    io_priority=nri.LinuxIOPriority(**{"class": nri.IOPRIO_CLASS_BE, "priority": 4})
                )
            ),
            "process.ioPriority",
        ),
        (
            nri.ContainerAdjustment(
                linux=nri.LinuxContainerAdjustment(scheduler=nri.LinuxScheduler(policy=nri.SCHED_BATCH))
            ),
            "process.scheduler",
        ),
        (nri.ContainerAdjustment(CDI_devices=[nri.CDIDevice(name="vendor.com/gpu=0")]), "CDI devices"),
        (
            nri.ContainerAdjustment(
                linux=nri.LinuxContainerAdjustment(
                    resources=nri.LinuxResources(blockio_class=nri.OptionalString(value="slow"))
                )
            ),
            "block I/O class",
        ),
    ],
    ids=["io-priority", "scheduler", "cdi", "blockio-class"],
)
def test_adjustments_the_runtimes_cannot_apply_are_refused(
    nri_env: Env, adjust: nri.ContainerAdjustment, words: str
) -> None:
    plugin = NriTestPlugin(_socket(nri_env), "toomuch", adjust=adjust).start()
    try:
        pod = nri_env.pod("refusedadj")
        with pytest.raises(grpc.RpcError) as err:
            nri_env.cri.create_container(pod, "c", nri_env.image, command=["sleep", "100"])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert words in err.value.details() and "toomuch" in err.value.details()
        assert nri_env.cri.list_containers() == []
        assert list((nri_env.daemon.state / "containers").iterdir()) == []
    finally:
        plugin.stop()


def test_late_plugin_is_synchronised_with_existing_containers(nri_env: Env) -> None:
    pod = nri_env.pod("early")
    nri_env.run(pod, "already-there", ["sleep", "100"])
    plugin = NriTestPlugin(_socket(nri_env), "late").start()
    try:
        assert plugin.synced_containers == ["already-there"]
    finally:
        plugin.stop()


def test_conflicting_plugins_fail_create_and_leave_nothing(nri_env: Env) -> None:
    first = NriTestPlugin(
        _socket(nri_env), "one", "10", adjust=nri.ContainerAdjustment(env=[nri.KeyValue(key="X", value="1")])
    ).start()
    second = NriTestPlugin(
        _socket(nri_env), "two", "20", adjust=nri.ContainerAdjustment(env=[nri.KeyValue(key="X", value="2")])
    ).start()
    try:
        pod = nri_env.pod("conflict")
        with pytest.raises(grpc.RpcError) as err:
            nri_env.cri.create_container(pod, "clash", nri_env.image, command=["sleep", "100"])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "10-one and 20-two both adjust env 'X'" in err.value.details()
        assert nri_env.cri.list_containers() == []
        assert list((nri_env.daemon.state / "containers").iterdir()) == []
    finally:
        first.stop()
        second.stop()


def test_plugin_error_fails_create_and_retry_succeeds_once_gone(nri_env: Env) -> None:
    plugin = NriTestPlugin(_socket(nri_env), "refuser", fail_create="policy says no").start()
    pod = nri_env.pod("refused")
    with pytest.raises(grpc.RpcError) as err:
        nri_env.cri.create_container(pod, "nope", nri_env.image, command=["sleep", "100"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "policy says no" in err.value.details()
    plugin.stop()
    cid = nri_env.run(pod, "nope", ["sleep", "100"])
    assert nri_env.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_RUNNING


def test_plugin_that_times_out_is_dropped_and_the_call_goes_on(nri_env: Env) -> None:
    adjust = nri.ContainerAdjustment(env=[nri.KeyValue(key="SLOW", value="1")])
    plugin = NriTestPlugin(_socket(nri_env), "sluggish", adjust=adjust, create_delay=3).start()
    try:
        pod = nri_env.pod("slow")
        cid = nri_env.run(pod, "waited", ["sleep", "100"])
        assert "SLOW=1" not in exec_out(nri_env.cri, cid, "env")
        assert wait_for(lambda: plugin.closed, timeout=5)
        assert "sluggish" in nri_env.daemon.log_tail(200) and "timed out" in nri_env.daemon.log_tail(200)
    finally:
        plugin.stop()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x02\x00\x00\x00\x0a" + struct.pack(">IIBB", 1 << 30, 1, 1, 0),
        b"\x00\x00\x00\x02\x00\x00\x00\x0d" + struct.pack(">IIBB", 3, 1, 1, 0) + b"\xff\xff\xff",
        b"\xff" * 64,
    ],
    ids=["oversized", "not-protobuf", "noise"],
)
def test_malformed_frames_drop_the_plugin_and_the_daemon_is_fine(nri_env: Env, garbage: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(_socket(nri_env)))
        raw.sendall(garbage)
        raw.settimeout(5)
        assert raw.recv(1024) == b""  # the daemon hung up
    plugin = NriTestPlugin(_socket(nri_env), "after-garbage").start()
    try:
        pod = nri_env.pod("still-fine")
        nri_env.run(pod, "ok", ["sleep", "100"])
        assert ("CreateContainer", "ok") in plugin.events
    finally:
        plugin.stop()


def test_preinstalled_plugin_is_started_and_adjusts(daemon_factory, pod_image: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    script = plugins / "10-preinstalled"
    script.write_text(
        # The daemon starts it with its own working directory: the tree must be on the path.
        f"#!{sys.executable}\nimport runpy, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "runpy.run_module('tests.support.nri_plugin', run_name='__main__')\n"
    )
    script.chmod(0o755)
    bridge = f"pyn{secrets.token_hex(3)}"
    daemon = daemon_factory(
        f'default_runtime = "runc"\n[network]\nconf_dir = "{tmp_path}"\n'
        f'pod_subnet = "198.18.121.0/24"\nbridge = "{bridge}"\n'
        f'[nri]\nenable = true\ndisable_connections = true\nsocket_path = "{tmp_path / "nri.sock"}"\n'
        f'plugin_path = "{plugins}"\nplugin_config_path = "{tmp_path / "conf.d"}"\n',
        name="preinstalled",
    )
    try:
        with daemon.client() as cri:
            cri.pull(pod_image)
            pod = cri.run_pod("pre")
            assert wait_for(lambda: "NRI plugin registered" in daemon.log_tail(400), timeout=10)
            cid = cri.create_container(pod, "c", pod_image, command=["sleep", "100"])
            cri.start_container(cid)
            assert f"PREINSTALLED={script}" in exec_out(cri, cid, "env")
            assert not (tmp_path / "nri.sock").exists()  # disable_connections: no socket
            cri.stop_pod(pod)
            cri.remove_pod(pod)
        daemon.stop()
        assert subprocess.run(["pgrep", "-f", str(script)], capture_output=True).stdout == b""
    finally:
        daemon.kill()
        force_cleanup(daemon)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
