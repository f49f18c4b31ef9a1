"""Deployment: `pycri check`, the manifests, sd_notify, and make install / uninstall."""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cri_runtime.daemon import check, sdnotify
from cri_runtime.daemon.client import CRIClient
from cri_runtime.daemon.config import Config, config_from_dict
from cri_runtime.network.cni import CNI
from cri_runtime.oci import runtimes as oci_runtimes
from tests.support.host import TIME_SCALE

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
ENDPOINT = f"unix://{Config().socket}"
# What kubelet 1.28+ and kubeadm accept.
API_VERSIONS = {
    "KubeletConfiguration": {"kubelet.config.k8s.io/v1beta1"},
    "InitConfiguration": {"kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"},
    "JoinConfiguration": {"kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"},
    "ClusterConfiguration": {"kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"},
    "RuntimeClass": {"node.k8s.io/v1"},
}
EXAMPLE_POD_RANGE = ipaddress.ip_network("198.18.0.0/15")


def _pycri(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cri_runtime.daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "crictl.yaml":  # crictl's own format, not a Kubernetes object
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            assert {"apiVersion", "kind"} <= set(doc), f"{path.name}: a document lacks apiVersion or kind"
            docs.append((path.name, doc))
    return docs


# --- pycri check --------------------------------------------------------------------


@pytest.mark.root
def test_check_passes_on_this_host_in_under_a_second(tmp_path: Path) -> None:
    config = tmp_path / "pycri.toml"
    config.write_text("")
    start = time.monotonic()
    result = _pycri(
        "check",
        "--config",
        str(config),
        "--root",
        str(tmp_path / "root"),
        "--state",
        str(tmp_path / "state"),
        "--socket",
        str(tmp_path / "pycri.sock"),
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pycri can run here" in result.stdout
    for needle in ("overlayfs", "namespaces", "cgroup", "conmon", "CNI network", "root ", "state "):
        assert needle in result.stdout
    assert not tmp_path.joinpath("root").exists() and not tmp_path.joinpath("state").exists()
    assert elapsed < 1.0 * TIME_SCALE, f"pycri check took {elapsed:.2f}s"


@pytest.mark.root
def test_check_names_every_problem_in_one_run_with_a_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "pycri.toml"
    config.write_text(
        f'[network]\nbin_dirs = ["{tmp_path / "no-cni-bin"}"]\nconf_dir = "{tmp_path / "net.d"}"\n'
    )
    result = _pycri(
        "check",
        "--config",
        str(config),
        "--root",
        str(blocker / "root"),
        "--state",
        str(tmp_path / "state"),
        "--socket",
        str(blocker / "pycri.sock"),
    )
    assert result.returncode == 1, result.stdout
    out = result.stdout
    assert "lacks plugins" in out and "containernetworking-plugins" in out
    assert f"root {blocker / 'root'}" in out and "is not a directory" in out
    assert f"socket directory {blocker}" in out
    assert "pycri cannot run here: 3 problem(s)" in out
    assert out.count("->") >= 3


def test_check_names_missing_runtimes_and_monitor_fixes() -> None:
    missing = {
        name: oci_runtimes.RuntimeInfo(
            name, "", "", False, f"{name} is not installed (apt-get install {name})"
        )
        for name in oci_runtimes.CANDIDATES
    }
    findings = check.check_binaries(Config(), missing)
    failures = [f for f in findings if f.level == check.FAIL]
    assert any("no usable OCI runtime" in f.what and "crun" in f.what and "runc" in f.what for f in failures)
    assert all(f.fix for f in failures)
    assert check.exit_code(findings) == 1


def test_check_falls_back_to_runc_with_a_warning() -> None:
    runtimes = {
        "crun": oci_runtimes.RuntimeInfo("crun", "/usr/bin/crun", "crun 1", False, "hybrid cgroups"),
        "runc": oci_runtimes.RuntimeInfo("runc", "/usr/sbin/runc", "runc 1", True, ""),
    }
    findings = check.check_binaries(Config(), runtimes)
    assert any(f.level == check.WARN and "using runc" in f.what for f in findings)
    assert not any(f.level == check.FAIL and f.area == "runtime" for f in findings)


def _fake_host(tmp_path: Path, filesystems: str, namespaces: list[str], v2_controllers: str) -> check.Host:
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "filesystems").write_text(filesystems)
    for ns in namespaces:
        (proc / "self" / "ns" / ns).write_text("")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cgroup.controllers").write_text(v2_controllers)
    return check.Host(proc=proc, cgroup_root=cgroup)


def test_check_kernel_names_overlay_namespaces_controllers_and_old_kernels(tmp_path: Path) -> None:
    host = _fake_host(tmp_path, "nodev\ttmpfs\n\text4\n", ["net", "mnt"], "cpu io\n")
    findings = check.check_kernel(host, release="5.10.0-28-s390x")
    problems = {f.what: f for f in findings if f.level != check.OK}
    text = "\n".join(problems)
    assert "overlayfs" in text and "modprobe overlay" in "\n".join(f.fix for f in problems.values())
    assert "ipc, uts, pid" in text and "user, cgroup" in text
    assert not any(f.level == check.FAIL and "user" in f.what for f in findings)
    assert "memory, pids" in text
    assert "5.12" in text
    assert check.exit_code(findings) == 1


def test_check_kernel_is_quiet_on_a_complete_cgroup_v2_host(tmp_path: Path) -> None:
    namespaces = list(check.NAMESPACES + check.OPTIONAL_NAMESPACES)
    host = _fake_host(tmp_path, "nodev\toverlay\n", namespaces, "cpuset cpu io memory pids\n")
    findings = check.check_kernel(host, release="6.1.0-18-s390x")
    assert [f for f in findings if f.level != check.OK] == []
    assert any("cgroup v2" in f.what for f in findings)


def test_check_refuses_a_root_on_overlayfs(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        "22 1 8:1 / / rw - ext4 /dev/vda rw\n"
        f"99 22 0:50 / {tmp_path} rw - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c\n"
    )
    assert check.filesystem_type(tmp_path / "root", proc) == "overlay"
    [finding] = check.check_directory("root", tmp_path / "root", overlay_upper=True, proc=proc)
    assert finding.level == check.FAIL and "overlay" in finding.what and finding.fix


def test_check_names_the_platform_pulled_and_honours_the_override() -> None:
    [finding] = check.check_platform(Config())
    assert finding.level == check.OK and "linux/" in finding.what
    s390x = config_from_dict({"image": {"platform": "linux/s390x"}})
    [finding] = check.check_platform(s390x)
    assert "pulls linux/s390x manifests (image.platform)" in finding.what


def test_check_reports_a_live_socket_and_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        [stale] = check.check_socket(path)
        server.listen()
        [live] = check.check_socket(path)
    assert stale.level == check.OK and "stale" in stale.what
    assert live.level == check.WARN and "live" in live.what


# --- manifests ------------------------------------------------------------------------


def test_manifests_parse_and_carry_accepted_api_versions() -> None:
    docs = _documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert set(API_VERSIONS) <= kinds
    for name, doc in docs:
        assert doc["apiVersion"] in API_VERSIONS[doc["kind"]], f"{name}: {doc['kind']} {doc['apiVersion']}"
    kubeadm_versions = {doc["apiVersion"] for _, doc in docs if doc["kind"] == "InitConfiguration"}
    assert kubeadm_versions == {"kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"}


def test_kubelet_and_kubeadm_point_at_pycri_with_its_cgroup_driver() -> None:
    docs = _documents()
    for name, doc in docs:
        if doc["kind"] == "KubeletConfiguration":
            assert doc["containerRuntimeEndpoint"] == ENDPOINT, name
            assert doc["cgroupDriver"] == Config().cgroup_driver, name
        if doc["kind"] in ("InitConfiguration", "JoinConfiguration"):
            assert doc["nodeRegistration"]["criSocket"] == ENDPOINT, name
        if doc["kind"] == "ClusterConfiguration":
            assert ipaddress.ip_network(doc["networking"]["podSubnet"]).subnet_of(EXAMPLE_POD_RANGE)
    crictl = yaml.safe_load((MANIFESTS / "crictl.yaml").read_text())
    assert crictl["runtime-endpoint"] == crictl["image-endpoint"] == ENDPOINT


def test_runtime_classes_match_the_handlers_pycri_serves() -> None:
    classes = [doc for _, doc in _documents() if doc["kind"] == "RuntimeClass"]
    assert sorted(doc["handler"] for doc in classes) == sorted(oci_runtimes.CANDIDATES)
    for doc in classes:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["handler"])


def test_cni_example_is_a_valid_node_network(tmp_path: Path) -> None:
    conflist = json.loads((MANIFESTS / "10-pycri.conflist").read_text())
    types = [p["type"] for p in conflist["plugins"]]
    assert types == ["bridge", "portmap"] and conflist["plugins"][0]["ipam"]["type"] == "host-local"
    for ranges in conflist["plugins"][0]["ipam"]["ranges"]:
        for entry in ranges:
            assert ipaddress.ip_network(entry["subnet"]).subnet_of(EXAMPLE_POD_RANGE)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    shutil.copy(MANIFESTS / "10-pycri.conflist", conf_dir)
    bin_dirs = [Path(d) for d in Config().network.bin_dirs]
    cni = CNI(conf_dir, bin_dirs, tmp_path / "cache")
    ready, message = cni.ready()
    assert "10-pycri.conflist" in message
    if any((d / "bridge").exists() for d in bin_dirs):
        assert ready, message


def test_shipped_config_is_loadable_as_the_installed_file() -> None:
    import tomllib

    assert config_from_dict(tomllib.loads((MANIFESTS / "pycri.toml").read_text())) == Config()


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((MANIFESTS / "pycri.service").read_text())
    return parser


def test_unit_has_the_settings_a_node_runtime_needs() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split() == ["/usr/local/bin/pycri", "serve"]
    assert service["KillMode"] == "process"
    assert service["Delegate"] == "yes"
    assert service["LimitNOFILE"] == "1048576"
    assert service["OOMScoreAdjust"] == "-999"
    assert service["Restart"] == "on-failure"
    assert "network-online.target" in unit["Unit"]["After"]
    assert "network-online.target" in unit["Unit"]["Wants"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at a stand-in for the installed command.
    stand_in = tmp_path / "pycri"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "pycri.service"
    unit.write_text((MANIFESTS / "pycri.service").read_text().replace("/usr/local/bin/pycri", str(stand_in)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 even for settings it ignores; it names them on stderr.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "pycri.service" in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


# --- sd_notify --------------------------------------------------------------------------


def test_notify_sends_to_a_path_socket_and_an_abstract_one(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        receiver.settimeout(5)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert receiver.recv(256) == b"READY=1"
    name = f"pycri-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert receiver.recv(256) == b"STOPPING=1"


def test_notify_does_nothing_without_a_manager(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative"})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


@pytest.mark.root
def test_serve_notifies_ready_once_the_socket_answers_and_stopping_at_shutdown(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify"
    cri_socket = tmp_path / "pycri.sock"
    config = tmp_path / "pycri.toml"
    config.write_text("")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(notify_path))
        receiver.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        log = open(tmp_path / "pycri.log", "wb")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cri_runtime.daemon.cli",
                "serve",
                "--config",
                str(config),
                "--socket",
                str(cri_socket),
                "--root",
                str(tmp_path / "root"),
                "--state",
                str(tmp_path / "state"),
            ],
            stdout=log,
            stderr=log,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        log.close()
        try:
            assert receiver.recv(256) == b"READY=1"
            with CRIClient(f"unix://{cri_socket}", timeout=5) as client:
                assert client.version().runtime_name
            process.send_signal(signal.SIGTERM)
            assert receiver.recv(256) == b"STOPPING=1"
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# --- make install / uninstall -------------------------------------------------------------


def _tree(base: Path) -> dict[str, str]:
    out = {}
    for path in sorted(base.rglob("*")):
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        out[str(path.relative_to(base))] = kind
    return out


def _build_artefacts() -> dict[str, int]:
    """What building pycri could leave in the source tree (install builds from a copy)."""
    out = {}
    for name in ("build", "dist", "pycri.egg-info"):
        for path in [ROOT / name, *sorted((ROOT / name).rglob("*"))] if (ROOT / name).exists() else []:
            out[str(path)] = path.lstat().st_mtime_ns
    return out


def _missing_runtime_packages() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    packages = re.search(r"^RUNTIME_PACKAGES := (.*)$", makefile, re.M)
    assert packages
    return [
        p
        for p in packages.group(1).split()
        if subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode != 0
    ]


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("dpkg") is None, reason="needs make and dpkg"
)
def test_make_install_check_uninstall_leaves_the_machine_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "node"
    for d in (
        "opt",
        "usr/local/bin",
        "etc/systemd/system",
        "etc/systemd/network",
        "etc/modules-load.d",
        "var/lib",
    ):
        (target / d).mkdir(parents=True)
    paths = {
        "PYCRI_HOME": target / "opt/pycri",
        "BINDIR": target / "usr/local/bin",
        "SYSCONFDIR": target / "etc/pycri",
        "UNITDIR": target / "etc/systemd/system",
        "CRICTL_CONFIG": target / "etc/crictl.yaml",
        "DATADIR": target / "var/lib/pycri",
        "MODULESLOADDIR": target / "etc/modules-load.d",
        "NETWORKDIR": target / "etc/systemd/network",
    }
    variables = [f"{k}={v}" for k, v in paths.items()]
    # With the runtime packages there the apt step is a no-op; CI lets it install them as on a node.
    missing = _missing_runtime_packages()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"make install would apt-get install {missing}; run it once first")
    real = ["/opt/pycri", "/usr/local/bin/pycri", "/etc/pycri", "/etc/systemd/system/pycri.service"]
    real_before = {p: os.path.lexists(p) for p in real}
    source_before = _build_artefacts()
    before = _tree(target)

    def make(*args: str) -> str:
        result = subprocess.run(
            ["make", "-s", "-C", str(ROOT), *args, *variables],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    make("install")
    pycri = paths["BINDIR"] / "pycri"
    assert pycri.is_symlink() and os.readlink(pycri) == str(paths["PYCRI_HOME"] / "bin/pycri")
    assert (paths["SYSCONFDIR"] / "pycri.toml").read_text() == (MANIFESTS / "pycri.toml").read_text()
    assert (paths["UNITDIR"] / "pycri.service").read_text() == (MANIFESTS / "pycri.service").read_text()
    # overlayfs is loaded now and at every boot (a fresh cloud kernel boots without it).
    assert (paths["MODULESLOADDIR"] / "pycri.conf").read_text() == "overlay\n"
    assert "overlay" in Path("/proc/filesystems").read_text()
    # udev leaves pod veths' MAC addresses alone (the bridge plugin's CHECK compares them).
    link = (paths["NETWORKDIR"] / "90-pycri-veth.link").read_text()
    assert "Driver=veth bridge" in link and "MACAddressPolicy=none" in link
    result = subprocess.run(
        [
            str(pycri),
            "check",
            "--config",
            str(paths["SYSCONFDIR"] / "pycri.toml"),
            "--root",
            str(paths["DATADIR"]),
            "--state",
            str(tmp_path / "state"),
            "--socket",
            str(tmp_path / "pycri.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # An existing configuration survives a reinstall; data survives an uninstall without PURGE.
    (paths["SYSCONFDIR"] / "pycri.toml").write_text('log_level = "debug"\n')
    assert "keeping" in make("install")
    assert (paths["SYSCONFDIR"] / "pycri.toml").read_text() == 'log_level = "debug"\n'
    paths["DATADIR"].mkdir()
    (paths["DATADIR"] / "pycri.db").write_text("")
    make("uninstall")
    assert (paths["DATADIR"] / "pycri.db").exists()
    assert (paths["SYSCONFDIR"] / "pycri.toml").exists()
    make("uninstall", "PURGE=1")

    assert _tree(target) == before
    assert {p: os.path.lexists(p) for p in real} == real_before
    assert _build_artefacts() == source_before
