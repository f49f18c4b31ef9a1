"""pycri's netlink, against the real kernel: ``lo`` in a new pod netns, a pod's interface
counters, and the start-up sweep of veths left on pycri's bridge.

Each test makes its own namespaces, veths (198.19.201.0/30) and bridge, checks what the kernel
shows with tools other than pycri's (``ip``, sockets), and removes all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from cri_runtime.network import netns
from cri_runtime.network.cni import CNI
from cri_runtime.runtime import recovery
from cri_runtime.stats import collectors
from tests.support.daemon import bridge_ports

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and links"),
]

HOST_ADDRESS = "198.19.201.1"
POD_ADDRESS = "198.19.201.2"
PREFIX = 30


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _in(pin: Path, *argv: str) -> str:
    return _run("nsenter", f"--net={pin}", *argv)


def _name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"  # at most 15 bytes with a 3-5 byte prefix


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@contextlib.contextmanager
def _links() -> Iterator[list[str]]:
    """A list the test appends the host links it made to; they are deleted after."""
    made: list[str] = []
    try:
        yield made
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        assert not [name for name in made if _link_exists(name)]


@contextlib.contextmanager
def _pod_netns(directory: Path) -> Iterator[Path]:
    pinned = netns.create_pod_namespaces(directory, net=True, ipc=False, uts=False, hostname="")
    assert pinned.net is not None
    try:
        yield pinned.net
    finally:
        netns.remove_pod_namespaces(pinned)


def _veth_into(pin: Path, host_end: str, pod_end: str = "eth0") -> None:
    """A veth pair: ``host_end`` here, ``pod_end`` in the namespace at ``pin``; both up."""
    _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end, "netns", str(pin))
    _run("ip", "link", "set", host_end, "up")
    _in(pin, "ip", "link", "set", pod_end, "up")


def _ip_counters(pin: Path, name: str) -> dict[str, int]:
    [link] = json.loads(_in(pin, "ip", "-j", "-s", "link", "show", name))
    rx, tx = link["stats64"]["rx"], link["stats64"]["tx"]
    return {
        "rx_bytes": rx["bytes"],
        "rx_packets": rx["packets"],
        "rx_errors": rx["errors"],
        "rx_dropped": rx["dropped"],
        "tx_bytes": tx["bytes"],
        "tx_packets": tx["packets"],
        "tx_errors": tx["errors"],
        "tx_dropped": tx["dropped"],
    }


def _as_counters(interface: collectors.Interface) -> dict[str, int]:
    return {key: value for key, value in vars(interface).items() if key != "name"}


def _read(pin: Path) -> dict[str, collectors.Interface]:
    found = collectors.read_networks([pin])[pin]
    assert found is not None
    return {interface.name: interface for interface in found}


# --- lo in a new pod netns ---------------------------------------------------------------------


def test_a_new_pod_netns_has_lo_up_with_its_loopback_address(tmp_path: Path) -> None:
    with _pod_netns(tmp_path / "ns") as pin:
        [lo] = json.loads(_in(pin, "ip", "-j", "addr", "show", "lo"))
        assert "UP" in lo["flags"]
        assert {a["local"] for a in lo["addr_info"]} >= {"127.0.0.1"}
        # And it carries traffic: a datagram to 127.0.0.1 inside the pod comes back.
        with netns.enter_netns(pin):
            receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with receiver, sender:
            receiver.bind(("127.0.0.1", 0))
            receiver.settimeout(5)
            sender.sendto(b"ping", receiver.getsockname())
            assert receiver.recv(16) == b"ping"


# --- a pod's interface counters ----------------------------------------------------------------


def test_pod_counters_match_the_kernel_and_the_traffic_sent(tmp_path: Path) -> None:
    host_end = _name("pyn")
    with _pod_netns(tmp_path / "ns") as pin, _links() as made:
        _veth_into(pin, host_end)
        made.append(host_end)
        # A silent link, so the counters move only with the test's traffic: no IPv6 (router
        # solicitations, DAD), no ARP (permanent neighbours on both ends).
        _run("sysctl", "-qw", f"net.ipv6.conf.{host_end}.disable_ipv6=1")
        _in(pin, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
        host_mac = json.loads(_run("ip", "-j", "link", "show", host_end))[0]["address"]
        pod_mac = json.loads(_in(pin, "ip", "-j", "link", "show", "eth0"))[0]["address"]
        _run("ip", "addr", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", host_end)
        _in(pin, "ip", "addr", "add", f"{POD_ADDRESS}/{PREFIX}", "dev", "eth0")
        _run("ip", "neigh", "replace", POD_ADDRESS, "lladdr", pod_mac, "dev", host_end, "nud", "permanent")
        _in(
            pin, "ip", "neigh", "replace", HOST_ADDRESS, "lladdr", host_mac, "dev", "eth0", "nud", "permanent"
        )

        before = _read(pin)
        assert set(before) == {"lo", "eth0"}
        assert _as_counters(before["eth0"]) == _ip_counters(pin, "eth0")

        with netns.enter_netns(pin):
            in_pod = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        on_host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        count, payload = 7, 300
        with in_pod, on_host:
            in_pod.bind((POD_ADDRESS, 0))
            on_host.bind((HOST_ADDRESS, 0))
            in_pod.settimeout(5)
            on_host.settimeout(5)
            for _ in range(count):
                on_host.sendto(b"h" * payload, in_pod.getsockname())
                assert len(in_pod.recv(2048)) == payload
                in_pod.sendto(b"p" * payload, on_host.getsockname())
                assert len(on_host.recv(2048)) == payload

        after = _read(pin)
        frame = payload + 8 + 20 + 14  # UDP, IPv4 and Ethernet headers: what the veth counts
        eth0 = after["eth0"]
        assert eth0.rx_packets - before["eth0"].rx_packets == count
        assert eth0.tx_packets - before["eth0"].tx_packets == count
        assert eth0.rx_bytes - before["eth0"].rx_bytes == count * frame
        assert eth0.tx_bytes - before["eth0"].tx_bytes == count * frame
        assert (eth0.rx_errors, eth0.tx_errors) == (0, 0)
        assert _as_counters(eth0) == _ip_counters(pin, "eth0")
        # What the stats service reports: eth0 as the default interface, lo left out.
        network = collectors._network(list(after.values()))
        assert network is not None and network.default == eth0
        assert [i.name for i in network.interfaces] == ["eth0"]


def test_reading_counters_leaves_no_thread_or_socket_behind(tmp_path: Path) -> None:
    with _pod_netns(tmp_path / "ns") as pin:
        collectors.read_networks([pin])
        threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            assert collectors.read_networks([pin])[pin] is not None
        assert (threading.active_count(), len(os.listdir("/proc/self/fd"))) == (threads, fds)


def test_a_gone_or_plain_netns_reads_as_none_and_the_others_still_read(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a namespace")
    with _pod_netns(tmp_path / "ns") as pin:
        found = collectors.read_networks([tmp_path / "missing", plain, pin])
        assert found[tmp_path / "missing"] is None and found[plain] is None
        assert [i.name for i in found[pin] or []] == ["lo"]


# --- the start-up sweep of veths on pycri's bridge ----------------------------------------------


def test_sweep_removes_veths_of_unknown_pods_and_keeps_the_rest(tmp_path: Path) -> None:
    """A known pod's veth stays; veths into an unknown pod's pin and into a netns only someone
    else holds go; what is no pod's veth (a tap, a pair with both ends here) stays."""
    bridge, state = _name("pyb"), tmp_path / "state"
    known_id, unknown_id = secrets.token_hex(32), secrets.token_hex(32)
    known_veth, unknown_veth, held_veth = _name("pyk"), _name("pyu"), _name("pyh")
    tap, local_a, local_b = _name("pyt"), _name("pya"), _name("pyz")
    held_netns = _name("pytnl-")
    with _links() as made, contextlib.ExitStack() as cleanup:
        _run("ip", "link", "add", bridge, "type", "bridge")
        made.append(bridge)
        known_pin = cleanup.enter_context(_pod_netns(state / "sandboxes" / known_id / "ns"))
        # An unknown pod's pin: the sweep unmounts it, which takes its veth with the netns.
        unknown = netns.create_pod_namespaces(
            state / "sandboxes" / unknown_id / "ns", net=True, ipc=False, uts=False, hostname=""
        )
        cleanup.callback(netns.remove_pod_namespaces, unknown)
        assert unknown.net is not None
        # A netns pycri does not pin, kept alive by someone else: only its veth is pycri's.
        _run("ip", "netns", "add", held_netns)
        cleanup.callback(subprocess.run, ["ip", "netns", "del", held_netns], capture_output=True)
        for pin, host_end in (
            (known_pin, known_veth),
            (unknown.net, unknown_veth),
            (Path("/run/netns") / held_netns, held_veth),
        ):
            _veth_into(pin, host_end)
            made.append(host_end)
        _run("ip", "tuntap", "add", "mode", "tap", "name", tap)
        _run("ip", "link", "add", local_a, "type", "veth", "peer", "name", local_b)
        made += [tap, local_a]
        for port in (known_veth, unknown_veth, held_veth, tap, local_a):
            _run("ip", "link", "set", port, "master", bridge)
        assert bridge_ports(bridge) == sorted([known_veth, unknown_veth, held_veth, tap, local_a])

        cni = CNI(state / "cni-conf", [], state / "cni", builtin_bridge=bridge)
        known = recovery.Known(sandboxes={known_id}, containers=set(), pod_cgroups=[])
        with structlog.testing.capture_logs() as logs:
            swept = recovery.sweep(state, tmp_path / "root", {}, cni, known, f"/{_name('pytnl')}")

        assert bridge_ports(bridge) == sorted([known_veth, tap, local_a])
        assert held_veth in swept.veths and not _link_exists(held_veth)
        assert not _link_exists(unknown_veth)
        assert str(state / "sandboxes" / unknown_id) in swept.directories
        removed = [e for e in logs if e["event"] == "removed a stale veth from pycri's bridge"]
        assert {e["veth"] for e in removed} == set(swept.veths)
        # The netns someone else holds is theirs: it stays, without the veth's other end.
        assert "eth0" not in _in(Path("/run/netns") / held_netns, "ip", "-o", "link", "show")
        # A second start finds nothing more to remove.
        assert recovery.sweep(state, tmp_path / "root", {}, cni, known, "/pytnl-none").veths == []


def test_sweep_without_the_bridge_removes_nothing(tmp_path: Path) -> None:
    cni = CNI(tmp_path / "cni-conf", [], tmp_path / "cni", builtin_bridge=_name("pyb"))
    known = recovery.Known(sandboxes=set(), containers=set(), pod_cgroups=[])
    assert recovery.sweep(tmp_path / "state", tmp_path / "root", {}, cni, known, "/pytnl-none").veths == []
