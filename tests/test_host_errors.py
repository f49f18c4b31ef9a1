"""A host that lacks a program pycri needs is a permanent problem: FAILED_PRECONDITION saying
what to install, never UNAVAILABLE (which kubelet retries forever). Refused writes and reads are
classified by their errno. Each test also checks that the failed call left nothing behind."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime import errors
from cri_runtime.cri.status import status_code
from cri_runtime.host import cgroups
from cri_runtime.host.systemd import slice_path
from cri_runtime.network import netns as pod_netns
from cri_runtime.network.cni import CNI
from cri_runtime.oci import podinit
from cri_runtime.oci import runtimes as oci_runtimes
from cri_runtime.oci.conmon import Executor
from tests.support.daemon import TEST_CGROUP_DRIVER, Daemon
from tests.support.rootfs import busybox_rootfs, minimal_spec

pytestmark = pytest.mark.root

FP = grpc.StatusCode.FAILED_PRECONDITION
PLUGIN_DIR = Path("/usr/lib/cni")
GARBAGE = b"\x7fELF but not really\x00"


def assert_host_problem(exc: errors.PycriError, missing: str, package: str) -> None:
    """FAILED_PRECONDITION, naming what is missing and the Debian package that provides it."""
    assert status_code(exc) == FP, (type(exc).__name__, str(exc))
    assert missing in str(exc), str(exc)
    assert re.search(rf"apt-get install (--reinstall )?{re.escape(package)}\b", str(exc)), str(exc)


def processes_with_environ(needle: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def executable(path: Path, content: bytes = GARBAGE, mode: int = 0o755) -> str:
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


# --- catatonit (pod PID namespace init) ---------------------------------------------------


@pytest.fixture
def init_tag(tmp_path: Path) -> Iterator[str]:
    """A tag no other pod init carries; every init started with it is killed at teardown."""
    tag = str(tmp_path / f"pod-{secrets.token_hex(4)}")
    yield tag
    for pid in processes_with_environ(f"PYCRI_SANDBOX={tag}".encode()):
        os.kill(pid, signal.SIGKILL)


def test_pod_init_starts_catatonit_as_pid_one_of_a_new_pid_namespace(init_tag: str) -> None:
    pid = podinit.start(init_tag)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == podinit.CATATONIT.encode()
    status = Path(f"/proc/{pid}/status").read_text()
    assert next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1] == "1"


@pytest.mark.parametrize("kind", ["missing", "not-executable", "not-a-program", "directory"])
def test_unusable_catatonit_is_failed_precondition_naming_the_package(
    tmp_path: Path, init_tag: str, kind: str
) -> None:
    path = tmp_path / "catatonit"
    if kind == "not-executable":
        executable(path, mode=0o644)
    elif kind == "not-a-program":
        executable(path)  # passes the access check; exec(2) refuses it (ENOEXEC)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(errors.PycriError) as caught:
        podinit.start(init_tag, catatonit=str(path))
    assert_host_problem(caught.value, str(path), "catatonit")
    assert processes_with_environ(f"PYCRI_SANDBOX={init_tag}".encode()) == []


def test_pod_init_with_a_missing_namespace_pin_is_classified_by_errno(tmp_path: Path, init_tag: str) -> None:
    with pytest.raises(errors.PycriError) as caught:
        podinit.start(init_tag, net=tmp_path / "no-such-pin")
    assert status_code(caught.value) == FP  # ENOENT: the host lacks what should be there
    assert "no-such-pin" in str(caught.value)
    with pytest.raises(errors.PycriError) as caught:
        podinit.start(init_tag, net=Path("/etc/hostname"))  # not a namespace: setns says EINVAL
    assert status_code(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "setns" in str(caught.value)
    assert processes_with_environ(f"PYCRI_SANDBOX={init_tag}".encode()) == []


# --- conmon and the OCI runtime ---------------------------------------------------------------


def usable_runtime() -> oci_runtimes.RuntimeInfo:
    for name in oci_runtimes.CANDIDATES:
        info = oci_runtimes.probe(name)
        if info.usable:
            return info
    pytest.skip("no usable OCI runtime on this host")


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A runnable bundle (busybox, ``sleep``) and its cgroup, removed at teardown."""
    cgroup = f"/pycri-hosterr-{secrets.token_hex(4)}"
    bundle = tmp_path / "bundle"
    rootfs = busybox_rootfs(bundle / "rootfs")
    spec = minimal_spec(rootfs, ["sleep", "60"], cgroups_path=f"{cgroup}/ctr")
    (bundle / "config.json").write_text(json.dumps(spec))
    yield bundle, cgroup
    cgroups.remove(cgroup)


def nothing_left(executor: Executor, container_id: str, bundle: Path, log_path: Path) -> bool:
    return (
        not (executor.state_dir / container_id).exists()
        and not (executor.runtime_root / container_id).exists()
        and not log_path.exists()
        and sorted(p.name for p in bundle.iterdir()) == ["config.json", "rootfs"]
    )


@pytest.mark.parametrize("what", ["conmon", "runtime"])
@pytest.mark.parametrize("kind", ["missing", "not-executable"])
def test_create_with_unusable_conmon_or_runtime_is_failed_precondition_and_leaves_nothing(
    tmp_path: Path, bundle: tuple[Path, str], what: str, kind: str
) -> None:
    info = usable_runtime()
    broken = tmp_path / f"broken-{what}"
    if kind == "not-executable":
        executable(broken, mode=0o644)
    runtime_path = str(broken) if what == "runtime" else info.path
    conmon_path = str(broken) if what == "conmon" else "/usr/bin/conmon"
    executor = Executor(info.name, runtime_path, tmp_path / "exec", conmon_path=conmon_path)
    log_path = tmp_path / "ctr.log"
    with pytest.raises(errors.PycriError) as caught:
        executor.create("hosterr-create", bundle[0], log_path)
    package = "conmon" if what == "conmon" else info.name
    assert_host_problem(caught.value, str(broken), package)
    assert nothing_left(executor, "hosterr-create", bundle[0], log_path)


def test_conmon_that_cannot_be_executed_is_failed_precondition_and_leaves_nothing(
    tmp_path: Path, bundle: tuple[Path, str]
) -> None:
    info = usable_runtime()
    broken = executable(tmp_path / "conmon")  # executable bit, but exec(2) says ENOEXEC
    executor = Executor(info.name, info.path, tmp_path / "exec", conmon_path=broken)
    log_path = tmp_path / "ctr.log"
    with pytest.raises(errors.PycriError) as caught:
        executor.create("hosterr-exec", bundle[0], log_path)
    assert_host_problem(caught.value, broken, "conmon")
    assert nothing_left(executor, "hosterr-exec", bundle[0], log_path)


def test_runtime_removed_under_a_running_container_is_failed_precondition(
    tmp_path: Path, bundle: tuple[Path, str]
) -> None:
    info = usable_runtime()
    state_dir = tmp_path / "exec"
    working = Executor(info.name, info.path, state_dir)
    working.create("hosterr-run", bundle[0], tmp_path / "run.log")
    try:
        working.start("hosterr-run")
        gone = tmp_path / "uninstalled" / info.name
        broken = Executor(info.name, str(gone), state_dir)
        for call in (
            lambda: broken.exec_sync("hosterr-run", ["true"], timeout=10),
            lambda: broken.state("hosterr-run"),
            lambda: broken.kill("hosterr-run", signal.SIGTERM),
        ):
            with pytest.raises(errors.PycriError) as caught:
                call()
            assert_host_problem(caught.value, str(gone), info.name)
        # Nothing was done to the container meanwhile.
        assert (working.state("hosterr-run") or {}).get("status") == "running"
    finally:
        working.delete("hosterr-run")
    assert not (state_dir / "hosterr-run").exists()


# --- CNI plugins --------------------------------------------------------------------------------


def write_conflist(conf_dir: Path, *plugin_types: str) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    plugins = [{"type": t} for t in plugin_types]
    (conf_dir / "10-test.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "hosterr", "plugins": plugins})
    )


@pytest.fixture
def cni_daemon(daemon_factory, tmp_path: Path) -> Callable[[list[str], list[Path]], Daemon]:  # type: ignore[no-untyped-def]
    def make(plugin_types: list[str], bin_dirs: list[Path]) -> Daemon:
        write_conflist(tmp_path / "net.d", *plugin_types)
        dirs = ", ".join(f'"{d}"' for d in bin_dirs)
        config = f'[network]\nconf_dir = "{tmp_path / "net.d"}"\nbin_dirs = [{dirs}]\n'
        return daemon_factory(config, name="cni")

    return make


def pod_leftovers(daemon: Daemon, cgroup_parent: str) -> dict[str, object]:
    def entries(path: Path) -> list[str]:
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    return {
        "sandboxes": entries(daemon.state / "sandboxes"),
        "cni cache": entries(daemon.state / "cni"),
        "cni ipam": entries(daemon.state / "cni-ipam"),
        "cgroups": [str(h) for h in cgroups.hierarchies() if (h / cgroup_parent.lstrip("/")).exists()],
    }


@pytest.mark.parametrize(
    ("plugin", "hint"),
    [
        ("ptp", "apt-get install containernetworking-plugins"),
        ("pyt-addon", "not part of containernetworking-plugins"),
    ],
)
def test_run_pod_with_a_missing_cni_plugin_is_failed_precondition_and_leaves_nothing(
    cni_daemon: Callable[[list[str], list[Path]], Daemon], tmp_path: Path, plugin: str, hint: str
) -> None:
    bin_dir = tmp_path / "cni-bin"  # loopback only: the conflist's plugin is not installed
    bin_dir.mkdir()
    (bin_dir / "loopback").symlink_to(PLUGIN_DIR / "loopback")
    if not (PLUGIN_DIR / "loopback").exists():
        pytest.skip("containernetworking-plugins is not installed")
    daemon = cni_daemon([plugin], [bin_dir])
    if TEST_CGROUP_DRIVER == "systemd":
        # The pod's own slice (a name, as kubelet passes under that driver), directly below -.slice.
        pod_parent = f"pycrihosterr{secrets.token_hex(4)}.slice"
        cgroup_parent = slice_path(pod_parent)
    else:
        cgroup_parent = f"/pycri-hosterr-{secrets.token_hex(4)}"
        pod_parent = f"{cgroup_parent}/pod"
    try:
        with daemon.client() as cri:
            network = next(c for c in cri.status().status.conditions if c.type == "NetworkReady")
            assert not network.status and plugin in network.message and hint in network.message
            with pytest.raises(grpc.RpcError) as caught:
                cri.run_pod("no-net", log_directory=str(tmp_path), cgroup_parent=pod_parent)
            assert caught.value.code() == FP, caught.value
            details = caught.value.details() or ""
            assert plugin in details and hint in details, details
            assert cri.list_pods() == []
        assert pod_leftovers(daemon, cgroup_parent) == {
            "sandboxes": [],
            "cni cache": [],
            "cni ipam": [],
            "cgroups": [],
        }
    finally:
        cgroups.remove(cgroup_parent)


def test_network_not_ready_names_the_missing_plugin_and_package(tmp_path: Path) -> None:
    write_conflist(tmp_path / "net.d", "bridge", "portmap")
    cni = CNI(tmp_path / "net.d", [tmp_path / "empty-bin"], tmp_path / "cni" / "cache")
    ready, message = cni.ready()
    assert not ready
    assert "bridge" in message and "portmap" in message and "loopback" in message
    assert "apt-get install containernetworking-plugins" in message


RESULT = '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"198.18.77.2/24"}]}'


def test_cni_del_with_a_plugin_gone_is_failed_precondition_and_keeps_the_record(tmp_path: Path) -> None:
    if not (PLUGIN_DIR / "loopback").exists():
        pytest.skip("containernetworking-plugins is not installed")
    bin_dir = tmp_path / "cni-bin"
    bin_dir.mkdir()
    (bin_dir / "loopback").symlink_to(PLUGIN_DIR / "loopback")
    # A plugin that changes nothing: prints a result on ADD, succeeds on DEL.
    executable(
        bin_dir / "pyt-noop",
        f"#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = ADD ] && echo '{RESULT}'\nexit 0\n".encode(),
    )
    write_conflist(tmp_path / "net.d", "pyt-noop")
    cache = tmp_path / "cni" / "cache"
    pinned = pod_netns.create_pod_namespaces(tmp_path / "pod", net=True, ipc=False, uts=False, hostname="")
    assert pinned.net is not None
    try:
        installed = CNI(tmp_path / "net.d", [bin_dir], cache)
        installed.add(
            "hosterr-del", pinned.net, pod_name="p", pod_namespace="n", pod_uid="u", port_mappings=[]
        )
        uninstalled = CNI(tmp_path / "net.d", [tmp_path / "empty-bin"], cache)
        with pytest.raises(errors.PycriError) as caught:
            uninstalled.delete("hosterr-del", pinned.net)
        assert_host_problem(caught.value, "loopback", "containernetworking-plugins")
        assert "pyt-noop" in str(caught.value) and "network add-on" in str(caught.value)
        assert uninstalled.recorded_pods() == ["hosterr-del"]  # kept, so that a later DEL can retry
        installed.delete("hosterr-del", pinned.net)
        assert installed.recorded_pods() == []
    finally:
        pod_netns.remove_pod_namespaces(pinned)


# --- cgroup limits --------------------------------------------------------------------------


def test_pod_cgroup_limit_writes_are_classified_by_errno() -> None:
    path = f"/pycri-hosterr-{secrets.token_hex(4)}"
    with pytest.raises(errors.PycriError) as caught:
        cgroups.apply_limits(path, cpu_shares=512)  # the cgroup does not exist: ENOENT
    assert status_code(caught.value) == FP, caught.value
    assert "cpu" in str(caught.value) and path in str(caught.value)
    cgroups.create(path)
    try:
        with pytest.raises(errors.PycriError) as caught:
            cgroups.apply_limits(path, cpu_period=1, cpu_quota=-1)  # below the kernel's 1ms: EINVAL
        assert status_code(caught.value) == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert "cpu.cfs_period_us = 1" in str(caught.value) or "cpu.max" in str(caught.value)
        cgroups.apply_limits(path, cpu_shares=512, memory=64 << 20)
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                cgroups.remove(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
