"""Pod namespaces and CNI, against the real kernel and Debian's CNI plugins (as root).

Traffic goes only to loopback and to network namespaces these tests create; pod subnets
come from 198.18.0.0/15. Every test runs under ``host_guard``, which snapshots links,
mounts, iptables/nftables and forwarding sysctls, removes what the test left (its bridge,
portmap's shared chains, tables iptables-nft created) and then asserts the host is as
before.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cri_runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from cri_runtime.network import netns as pod_netns
from cri_runtime.network.cni import CNI, PodNetworkResult, PortMapping
from tests.support.host import TIME_SCALE

PLUGIN_DIR = Path("/usr/lib/cni")
FORWARDING_SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not (PLUGIN_DIR / "bridge").exists(), reason="containernetworking-plugins missing"),
]


# --- host state ---------------------------------------------------------------------


def _attachments(cni: CNI) -> list[str]:
    """Pods whose network attachment the CNI client has on record (its cache files)."""
    return sorted(p.stem for p in cni.cache_dir.glob("*.json") if not p.name.startswith("."))


def _run(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check).stdout


def _links() -> set[str]:
    return {line.split(": ")[1].split("@")[0] for line in _run("ip", "-o", "link", "show").splitlines()}


def _mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def _iptables(tool: str) -> dict[str, list[str]]:
    """iptables-save by table: chain declarations (counters dropped) and rules."""
    tables: dict[str, list[str]] = {}
    current = ""
    for line in _run(f"{tool}-save").splitlines():
        if line.startswith("*"):
            current = line[1:]
            tables[current] = []
        elif line.startswith(":"):
            tables[current].append(line.rsplit(" ", 1)[0])
        elif line.startswith("-A"):
            tables[current].append(line)
    return tables


def _nft_tables() -> set[str]:
    return {line.removeprefix("table ") for line in _run("nft", "list", "tables").splitlines() if line}


def _undo_iptables(tool: str, before: dict[str, list[str]]) -> None:
    """Delete rules and chains that appeared since ``before`` (portmap's shared chains stay otherwise)."""
    for table, lines in _iptables(tool).items():
        old = set(before.get(table, []))
        for line in reversed([x for x in lines if x.startswith("-A") and x not in old]):
            _run(tool, "-t", table, "-D", *shlex.split(line)[1:], check=False)
        for line in lines:
            if line.startswith(":") and line not in old:
                chain = line[1:].split()[0]
                _run(tool, "-t", table, "-F", chain, check=False)
                _run(tool, "-t", table, "-X", chain, check=False)


def _drop_new_empty_nft_tables(before: set[str]) -> None:
    for table in _nft_tables() - before:
        family, name = table.split()
        listing = json.loads(_run("nft", "-j", "list", "table", family, name))
        if not any("rule" in item for item in listing["nftables"]):
            _run("nft", "delete", "table", family, name)


@pytest.fixture(autouse=True)
def host_guard() -> Iterator[list[str]]:
    """Yields a list the test appends its bridge names to; restores and checks the host after."""
    links, mounts = _links(), _mountinfo()
    rules = {tool: _iptables(tool) for tool in ("iptables", "ip6tables")}
    tables = _nft_tables()
    sysctls = {path: Path(path).read_text() for path in FORWARDING_SYSCTLS}
    bridges: list[str] = []
    yield bridges
    for name in _links() - links:
        if name in bridges or name.startswith("veth"):
            _run("ip", "link", "del", name, check=False)
    for tool, saved in rules.items():
        _undo_iptables(tool, saved)
    _drop_new_empty_nft_tables(tables)
    for path, value in sysctls.items():
        Path(path).write_text(value)  # the bridge plugin (isGateway) turns forwarding on
    assert _links() == links
    assert _mountinfo() == mounts
    assert {tool: _iptables(tool) for tool in rules} == rules
    assert _nft_tables() == tables


# --- namespaces ---------------------------------------------------------------------


def _netns_inode_of_this_thread() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in _mountinfo())


def test_pod_namespaces_are_new_pinned_named_and_have_lo_up(tmp_path: Path) -> None:
    pinned = pod_netns.create_pod_namespaces(tmp_path / "ns", net=True, ipc=True, uts=True, hostname="web-0")
    try:
        assert pinned == pod_netns.PodNamespaces(
            tmp_path / "ns/net", tmp_path / "ns/ipc", tmp_path / "ns/uts"
        )
        for kind, path in (("net", pinned.net), ("ipc", pinned.ipc), ("uts", pinned.uts)):
            assert path is not None and _mounted(path)
            assert os.stat(path).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino
        assert _run("nsenter", f"--uts={pinned.uts}", "hostname").strip() == "web-0"
        assert socket.gethostname() != "web-0"
        [lo] = json.loads(_run("nsenter", f"--net={pinned.net}", "ip", "-j", "link", "show"))
        assert lo["ifname"] == "lo" and "UP" in lo["flags"]
        assert pod_netns.is_network_namespace(pinned.net)  # type: ignore[arg-type]
        assert not pod_netns.is_network_namespace(pinned.ipc)  # type: ignore[arg-type]
    finally:
        pod_netns.remove_pod_namespaces(pinned)


def test_remove_pod_namespaces_leaves_no_mount_or_file_and_can_repeat(tmp_path: Path) -> None:
    pinned = pod_netns.create_pod_namespaces(tmp_path / "ns", net=True, ipc=True, uts=True, hostname="a")
    pod_netns.remove_pod_namespaces(pinned)
    assert not any(str(tmp_path) in line for line in _mountinfo())
    assert list((tmp_path / "ns").iterdir()) == []
    pod_netns.remove_pod_namespaces(pinned)  # again: nothing to do, no error


def test_host_namespaces_are_not_pinned(tmp_path: Path) -> None:
    pinned = pod_netns.create_pod_namespaces(tmp_path / "ns", net=False, ipc=False, uts=False, hostname="x")
    assert pinned == pod_netns.PodNamespaces(None, None, None)
    only_ipc = pod_netns.create_pod_namespaces(tmp_path / "ns", net=False, ipc=True, uts=False, hostname="x")
    try:
        assert only_ipc.net is None and only_ipc.uts is None and only_ipc.ipc is not None
        assert sorted(p.name for p in (tmp_path / "ns").iterdir()) == ["ipc"]
    finally:
        pod_netns.remove_pod_namespaces(only_ipc)


def test_failed_creation_leaves_nothing_and_spares_what_it_did_not_make(tmp_path: Path) -> None:
    directory = tmp_path / "ns"
    directory.mkdir()
    (directory / "uts").write_text("not ours")
    with pytest.raises(AlreadyExists):
        pod_netns.create_pod_namespaces(directory, net=True, ipc=True, uts=True, hostname="a")
    assert sorted(p.name for p in directory.iterdir()) == ["uts"]
    assert (directory / "uts").read_text() == "not ours"
    assert not any(str(tmp_path) in line for line in _mountinfo())
    with pytest.raises(InvalidArgument, match="hostname"):
        pod_netns.create_pod_namespaces(tmp_path / "other", net=True, ipc=True, uts=True, hostname="h" * 65)
    assert not (tmp_path / "other").exists()


def test_creating_pod_namespaces_takes_milliseconds(tmp_path: Path) -> None:
    durations = []
    for i in range(10):
        start = time.perf_counter()
        pinned = pod_netns.create_pod_namespaces(
            tmp_path / str(i), net=True, ipc=True, uts=True, hostname="p"
        )
        durations.append(time.perf_counter() - start)
        pod_netns.remove_pod_namespaces(pinned)
    assert statistics.median(durations) < 0.020 * TIME_SCALE


def test_enter_netns_moves_only_this_thread_and_comes_back(tmp_path: Path) -> None:
    pinned = pod_netns.create_pod_namespaces(tmp_path / "ns", net=True, ipc=False, uts=False, hostname="")
    assert pinned.net is not None
    host_inode = _netns_inode_of_this_thread()
    # A thread that already runs: one started inside the block would inherit the pod's netns.
    other_thread_inode: list[int] = []
    look = threading.Event()

    def report_netns_when_asked() -> None:
        look.wait(10)
        other_thread_inode.append(_netns_inode_of_this_thread())

    probe = threading.Thread(target=report_netns_when_asked)
    probe.start()
    try:
        with pod_netns.enter_netns(pinned.net):
            assert _netns_inode_of_this_thread() == os.stat(pinned.net).st_ino
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
            look.set()
            probe.join()
        assert other_thread_inode == [host_inode]
        assert _netns_inode_of_this_thread() == host_inode
        with pytest.raises(RuntimeError), pod_netns.enter_netns(pinned.net):
            raise RuntimeError("body fails")
        assert _netns_inode_of_this_thread() == host_inode
        with pytest.raises(NotFound):
            pod_netns.enter_netns(tmp_path / "missing").__enter__()
        (tmp_path / "plain").write_text("")
        with pytest.raises(InvalidArgument):
            pod_netns.enter_netns(tmp_path / "plain").__enter__()
        assert _netns_inode_of_this_thread() == host_inode
    finally:
        pod_netns.remove_pod_namespaces(pinned)


# --- CNI ----------------------------------------------------------------------------


def _bridge_name(host_guard: list[str]) -> str:
    name = f"pyt{secrets.token_hex(2)}"
    host_guard.append(name)
    return name


@pytest.fixture
def make_pod(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Creates a pinned pod netns per name; removes what is left at teardown."""
    made: list[pod_netns.PodNamespaces] = []

    def make(name: str) -> Path:
        pinned = pod_netns.create_pod_namespaces(
            tmp_path / "pods" / name, net=True, ipc=False, uts=False, hostname=""
        )
        made.append(pinned)
        assert pinned.net is not None
        return pinned.net

    yield make
    for pinned in made:
        pod_netns.remove_pod_namespaces(pinned)


def _builtin(tmp_path: Path, host_guard: list[str], subnet: str, **kwargs: float) -> CNI:
    return CNI(
        tmp_path / "net.d",
        [PLUGIN_DIR],
        tmp_path / "cni" / "cache",
        builtin_subnet=subnet,
        builtin_bridge=_bridge_name(host_guard),
        **kwargs,  # type: ignore[arg-type]
    )


def _add(cni: CNI, pod_id: str, netns: Path, ports: list[PortMapping] | None = None) -> PodNetworkResult:
    return cni.add(
        pod_id,
        netns,
        pod_name=pod_id,
        pod_namespace="default",
        pod_uid=f"uid-{pod_id}",
        port_mappings=ports or [],
    )


def _ping(from_netns: Path, address: str) -> bool:
    result = subprocess.run(
        ["nsenter", f"--net={from_netns}", "busybox", "ping", "-c1", "-W1", address],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ipam_allocations(cni: CNI) -> list[str]:
    directory = cni.ipam_dir / "pycri"
    return sorted(p.name for p in directory.iterdir() if p.name[0].isdigit()) if directory.exists() else []


def _nat_rules() -> str:
    return _run("iptables-save")


def _host_veths() -> set[str]:
    return {name for name in _links() if name.startswith("veth")}


def test_builtin_network_gives_pods_addresses_and_they_reach_each_other(
    tmp_path: Path, host_guard: list[str], make_pod: Callable[[str], Path]
) -> None:
    cni = _builtin(tmp_path, host_guard, "198.18.250.0/24")
    assert cni.ready() == (True, f"CNI network 'pycri' (built-in bridge {host_guard[-1]} on 198.18.250.0/24)")
    first, second = make_pod("first"), make_pod("second")
    a = _add(cni, "pod-a", first)
    b = _add(cni, "pod-b", second)
    try:
        assert len(a.ips) == 1 and a.ips[0].startswith("198.18.250.")
        assert len(b.ips) == 1 and b.ips[0].startswith("198.18.250.") and b.ips != a.ips
        assert [i["name"] for i in a.interfaces if i.get("sandbox")] == ["eth0"]
        assert _ipam_allocations(cni) == sorted(a.ips + b.ips)
        assert _ping(first, b.ips[0]) and _ping(second, a.ips[0])
        cni.check("pod-a", first)
    finally:
        cni.delete("pod-a", first)
        cni.delete("pod-b", second)
    assert _ipam_allocations(cni) == []
    assert _attachments(cni) == []


def test_host_port_on_loopback_reaches_the_pod_until_delete(
    tmp_path: Path, host_guard: list[str], make_pod: Callable[[str], Path]
) -> None:
    cni = _builtin(tmp_path, host_guard, "198.18.251.0/24")
    pod = make_pod("web")
    host_port = _free_port()
    with pod_netns.enter_netns(pod):
        listener = socket.create_server(("0.0.0.0", 8080))  # stays in the pod's netns
    listener.settimeout(10)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.sendall(b"hello from the pod")

    result = _add(cni, "pod-web", pod, [PortMapping("tcp", 8080, host_port)])
    server = threading.Thread(target=serve)
    server.start()
    try:
        assert f"--dport {host_port}" in _nat_rules()
        assert f"--to-destination {result.ips[0]}:8080" in _nat_rules()
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as client:
            assert client.recv(100) == b"hello from the pod"
    finally:
        server.join(timeout=15)
        cni.delete("pod-web", pod)
    assert str(host_port) not in _nat_rules()
    assert "pod-web" not in _nat_rules()


def test_delete_after_the_netns_is_gone_releases_everything_and_can_repeat(
    tmp_path: Path, host_guard: list[str], make_pod: Callable[[str], Path]
) -> None:
    cni = _builtin(tmp_path, host_guard, "198.18.252.0/24")
    veths_before = _host_veths()
    pod = make_pod("gone")
    host_port = _free_port()
    result = _add(cni, "pod-gone", pod, [PortMapping("udp", 53, host_port)])
    assert len(_host_veths() - veths_before) == 1
    assert _ipam_allocations(cni) == result.ips
    # The conflist changes after ADD: DEL must still use the network that made the pod.
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-other.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "pyt-nonexistent"}]})
    )
    pod_netns.remove_pod_namespaces(pod_netns.PodNamespaces(pod, None, None))
    cni.delete("pod-gone", pod)
    assert _host_veths() == veths_before
    assert _ipam_allocations(cni) == []
    assert str(host_port) not in _nat_rules() and "pod-gone" not in _nat_rules()
    assert not (cni.cache_dir / "pod-gone.json").exists()
    cni.delete("pod-gone", pod)
    cni.delete("pod-gone", None)
    cni.delete("never-added", None)


def _plugin_script(directory: Path, name: str, body: str) -> None:
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


def _conflist(tmp_path: Path, bridge: str, subnet: str, *extra: dict[str, object]) -> None:
    plugins = [
        {
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(tmp_path / "cni" / "cni-ipam")},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
        *extra,
    ]
    (tmp_path / "net.d").mkdir(exist_ok=True)
    (tmp_path / "net.d" / "50-test.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "pycri", "plugins": plugins})
    )


def test_failing_plugin_is_reported_and_the_partial_add_is_undone(
    tmp_path: Path, host_guard: list[str], make_pod: Callable[[str], Path]
) -> None:
    bin_dir = tmp_path / "bin"
    _plugin_script(
        bin_dir,
        "pyt-fail",
        'cat >/dev/null\nif [ "$CNI_COMMAND" = ADD ]; then\n'
        '  echo \'{"cniVersion":"1.0.0","code":7,"msg":"pycri test failure","details":"asked to fail"}\'\n'
        "  echo 'failing on purpose' >&2\n  exit 1\nfi\n",
    )
    _conflist(tmp_path, _bridge_name(host_guard), "198.18.253.0/24", {"type": "pyt-fail"})
    cni = CNI(tmp_path / "net.d", [bin_dir, PLUGIN_DIR], tmp_path / "cni" / "cache")
    veths_before = _host_veths()
    pod = make_pod("failing")
    host_port = _free_port()
    with pytest.raises(Internal) as caught:
        _add(cni, "pod-fail", pod, [PortMapping("tcp", 80, host_port)])
    message = str(caught.value)
    assert "pyt-fail" in message and "pycri test failure" in message
    assert "asked to fail" in message and "failing on purpose" in message
    assert _host_veths() == veths_before
    assert _ipam_allocations(cni) == []
    assert str(host_port) not in _nat_rules()
    assert _attachments(cni) == []
    with pod_netns.enter_netns(pod):
        assert [name for _, name in socket.if_nameindex()] == ["lo"]


def test_missing_plugin_makes_network_not_ready_and_add_runs_nothing(
    tmp_path: Path, make_pod: Callable[[str], Path]
) -> None:
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-missing.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "m", "plugins": [{"type": "pyt-nonexistent"}]})
    )
    cni = CNI(tmp_path / "net.d", [PLUGIN_DIR], tmp_path / "cni" / "cache")
    ready, message = cni.ready()
    assert not ready and "pyt-nonexistent" in message and "10-missing.conflist" in message
    with pytest.raises(FailedPrecondition, match=r"pyt-nonexistent.*network add-on"):
        _add(cni, "pod-m", make_pod("m"))
    assert _attachments(cni) == []


def test_plugin_timeout_kills_the_plugin_and_undoes_the_add(
    tmp_path: Path, host_guard: list[str], make_pod: Callable[[str], Path]
) -> None:
    bin_dir = tmp_path / "bin"
    _plugin_script(bin_dir, "pyt-slow", 'cat >/dev/null\n[ "$CNI_COMMAND" = ADD ] && sleep 31.4159\nexit 0\n')
    _conflist(tmp_path, _bridge_name(host_guard), "198.18.254.0/24", {"type": "pyt-slow"})
    cni = CNI(tmp_path / "net.d", [bin_dir, PLUGIN_DIR], tmp_path / "cni" / "cache", plugin_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="pyt-slow"):
        _add(cni, "pod-slow", make_pod("slow"))
    assert time.monotonic() - start < 10
    assert "31.4159" not in _run("ps", "-eo", "args")
    assert _ipam_allocations(cni) == [] and _attachments(cni) == []


def test_failed_delete_keeps_the_record_so_a_retry_finishes(
    tmp_path: Path, host_guard: list[str], make_pod: Callable[[str], Path]
) -> None:
    bin_dir, marker = tmp_path / "bin", tmp_path / "fail-del"
    _plugin_script(
        bin_dir,
        "pyt-flaky",
        f'cat >/dev/null\nif [ "$CNI_COMMAND" = DEL ] && [ -e {marker} ]; then\n'
        '  echo \'{"cniVersion":"1.0.0","code":11,"msg":"busy, try later"}\'; exit 1\nfi\nexit 0\n',
    )
    # Spec-wise a chained plugin prints its prevResult on ADD; this one prints nothing,
    # which pycri tolerates by keeping the previous result.
    _conflist(tmp_path, _bridge_name(host_guard), "198.18.255.0/24", {"type": "pyt-flaky"})
    cni = CNI(tmp_path / "net.d", [bin_dir, PLUGIN_DIR], tmp_path / "cni" / "cache")
    pod = make_pod("flaky")
    result = _add(cni, "pod-flaky", pod)
    assert result.ips and result.ips[0].startswith("198.18.255.")
    marker.write_text("")
    with pytest.raises(Unavailable, match="busy, try later"):
        cni.delete("pod-flaky", pod)
    assert _attachments(cni) == ["pod-flaky"]
    marker.unlink()
    cni.delete("pod-flaky", pod)
    assert _attachments(cni) == [] and _ipam_allocations(cni) == []


def test_config_is_the_first_file_in_lexical_order_or_the_builtin(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    cni = CNI(conf_dir, [PLUGIN_DIR], tmp_path / "cni" / "cache", builtin_subnet="198.18.0.0/16")
    builtin = cni.config()
    assert builtin["name"] == "pycri" and [p["type"] for p in builtin["plugins"]] == ["bridge", "portmap"]
    assert builtin["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "198.18.0.0/16"}]]
    assert builtin["plugins"][0]["ipam"]["dataDir"] == str(tmp_path / "cni" / "cni-ipam")
    cni.set_pod_cidr("198.19.4.0/24")
    assert cni.config()["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "198.19.4.0/24"}]]
    conf_dir.mkdir()
    single = {"cniVersion": "1.0.0", "name": "single", "type": "bridge", "bridge": "pytx"}
    (conf_dir / "20-single.conf").write_text(json.dumps(single))
    (conf_dir / "README").write_text("not a config")
    assert cni.config() == {"cniVersion": "1.0.0", "name": "single", "plugins": [single]}
    (conf_dir / "10-list.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "list", "plugins": [{"type": "bridge"}]})
    )
    assert cni.config()["name"] == "list"
    (conf_dir / "05-broken.conflist").write_text("{not json")
    ready, message = cni.ready()
    assert not ready and "05-broken.conflist" in message
    with pytest.raises(InvalidArgument):
        cni.set_pod_cidr("not-a-cidr")


def test_add_refuses_bad_input_before_running_any_plugin(
    tmp_path: Path, make_pod: Callable[[str], Path]
) -> None:
    cni = CNI(tmp_path / "net.d", [PLUGIN_DIR], tmp_path / "cni" / "cache", builtin_bridge="pytunused")
    pod = make_pod("bad")
    with pytest.raises(InvalidArgument):
        _add(cni, "../escape", pod)
    with pytest.raises(InvalidArgument):
        _add(cni, "pod-bad", pod, [PortMapping("icmp", 80, 8080)])
    with pytest.raises(InvalidArgument):
        cni.add("pod-bad", pod, pod_name="a;b=c", pod_namespace="d", pod_uid="u", port_mappings=[])
    with pytest.raises(NotFound):
        _add(cni, "pod-bad", tmp_path / "no-such-netns")
    (tmp_path / "plain").write_text("")
    with pytest.raises(InvalidArgument):
        _add(cni, "pod-bad", tmp_path / "plain")
    assert _attachments(cni) == []
