"""Prometheus metrics: the text exposition format parsed back, the HTTP endpoint, and a real
daemon counting its RPCs, pulls, pods and containers."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cri_runtime.daemon import metrics
from cri_runtime.daemon.config import Config, config_from_dict, load_config
from cri_runtime.daemon.metrics import MetricsServer, PycriMetrics, Registry
from cri_runtime.errors import InvalidArgument
from tests.support.daemon import Daemon, force_cleanup
from tests.support.fakeregistry import FakeRegistry, Route
from tests.support.images import (
    OCI_MANIFEST,
    Image,
    busybox_layer,
    layer_from_files,
    push_image,
    random_layer,
)
from tests.support.registry import Registry as ImageRegistry
from tests.support.registry import free_port
from tests.support.wait import wait_for

# --- a strict reader of the text format (version 0.0.4) ------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)(?: (-?[0-9]+))?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_FLOAT = re.compile(r"^(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?Inf|NaN)$")
_HELP = re.compile(rf"^# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(text: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], text)


@dataclass
class Parsed:
    types: dict[str, str]
    helps: dict[str, str]
    # family -> [(sample name, labels, value)]
    samples: dict[str, list[tuple[str, dict[str, str], float]]]

    def value(self, name: str, **labels: str) -> float:
        """The one sample called ``name`` whose labels include ``labels``; 0 when absent."""
        found = [v for fam in self.samples.values() for n, lab, v in fam if n == name and _has(lab, labels)]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else 0.0

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for fam in self.samples.values() for n, lab, v in fam if n == name]


def _has(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


def parse_exposition(text: str) -> Parsed:
    """Parse ``text``, failing on any line outside the grammar or any misplaced sample."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: dict[str, list[tuple[str, dict[str, str], float]]] = defaultdict(list)
    current = ""
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            if match := _HELP.match(line):
                assert match.group(1) not in helps, f"{where}: second HELP"
                helps[match.group(1)] = _unescape(match.group(2))
            elif match := _TYPE.match(line):
                name = match.group(1)
                assert name not in types, f"{where}: second TYPE"
                assert name not in samples, f"{where}: TYPE after the family's samples"
                types[name] = match.group(2)
                current = name
            else:
                raise AssertionError(f"{where}: a HELP or TYPE line that does not parse")
            continue
        match = _SAMPLE.match(line)
        assert match, f"{where}: not a sample line"
        name, label_text, value_text = match.group(1), match.group(2), match.group(3)
        labels: dict[str, str] = {}
        if label_text:
            pos = 0
            while pos < len(label_text):
                label = _LABEL.match(label_text, pos)
                assert label, f"{where}: bad label pair at {label_text[pos:]!r}"
                assert label.group(1) not in labels, f"{where}: label {label.group(1)} twice"
                labels[label.group(1)] = _unescape(label.group(2))
                pos = label.end()
        assert _FLOAT.match(value_text), f"{where}: value is not a float"
        family = current
        suffixes = ("_bucket", "_sum", "_count") if types.get(current) == "histogram" else ("",)
        assert any(name == current + s for s in suffixes), f"{where}: sample outside its family {current}"
        samples[family].append((name, labels, float(value_text)))
    for name in samples:
        assert name in helps, f"{name} has no HELP"
    return Parsed(types, helps, dict(samples))


def check_histograms(parsed: Parsed) -> int:
    """Buckets cumulative and ordered, +Inf equal to _count; returns how many series were checked."""
    checked = 0
    for family, kind in parsed.types.items():
        if kind != "histogram":
            continue
        buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = defaultdict(list)
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        sums: set[tuple[tuple[str, str], ...]] = set()
        for name, labels, value in parsed.samples.get(family, []):
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            if name.endswith("_bucket"):
                buckets[key].append((float(labels["le"]), value))
            elif name.endswith("_count"):
                counts[key] = value
            else:
                sums.add(key)
        for key, series in buckets.items():
            bounds = [b for b, _ in series]
            assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), (family, key, bounds)
            assert bounds[-1] == math.inf, (family, key)
            values = [v for _, v in series]
            assert all(a <= b for a, b in itertools.pairwise(values)), (family, key, values)
            assert values[-1] == counts[key] and key in sums, (family, key)
            checked += 1
    return checked


# --- the format --------------------------------------------------------------------------------------


def test_exposition_parses_back_with_escaped_labels_and_help() -> None:
    registry = Registry()
    counter = registry.counter(
        "demo_requests_total", 'Requests, with a \\ backslash\nand "quotes".', ("path",)
    )
    gauge = registry.gauge("demo_temperature_celsius", "A gauge that goes below zero.")
    tricky = ["C:\\dir\\file", 'say "hi"', "two\nlines", "braces } and , commas", "ünïcödé", ""]
    for number, value in enumerate(tricky, 1):
        counter.inc(number, path=value)
    gauge.set(-3.5)
    parsed = parse_exposition(registry.exposition())
    assert parsed.types == {"demo_requests_total": "counter", "demo_temperature_celsius": "gauge"}
    assert parsed.helps["demo_requests_total"] == 'Requests, with a \\ backslash\nand "quotes".'
    got = {labels["path"]: value for labels, value in parsed.series("demo_requests_total")}
    assert got == {value: float(number) for number, value in enumerate(tricky, 1)}
    assert parsed.value("demo_temperature_celsius") == -3.5


def test_histogram_is_cumulative_with_inf_sum_and_count() -> None:
    registry = Registry()
    hist = registry.histogram("demo_seconds", "Durations.", (0.1, 1.0, 10.0), ("op",))
    observations = [0.05, 0.1, 0.5, 1.0, 2.0, 9.99, 10.0, 50.0, 0.0]
    for value in observations:
        hist.observe(value, op="a")
    hist.observe(3.0, op="b")
    parsed = parse_exposition(registry.exposition())
    assert check_histograms(parsed) == 2
    buckets = {lab["le"]: v for lab, v in parsed.series("demo_seconds_bucket") if lab["op"] == "a"}
    # le is "less than or equal": a value on a bound counts in that bucket.
    assert buckets == {"0.1": 3, "1": 5, "10": 8, "+Inf": 9}
    assert parsed.value("demo_seconds_count", op="a") == len(observations)
    assert parsed.value("demo_seconds_sum", op="a") == pytest.approx(sum(observations))
    assert parsed.value("demo_seconds_bucket", op="b", le="1") == 0
    assert parsed.value("demo_seconds_bucket", op="b", le="10") == 1


def test_unlabelled_metrics_show_zero_before_any_event() -> None:
    registry = Registry()
    registry.counter("demo_bytes_total", "Bytes.")
    registry.histogram("demo_wait_seconds", "Waits.", (1.0,))
    parsed = parse_exposition(registry.exposition())
    assert parsed.value("demo_bytes_total") == 0
    assert parsed.series("demo_wait_seconds_bucket") == [({"le": "1"}, 0.0), ({"le": "+Inf"}, 0.0)]
    assert check_histograms(parsed) == 1


def test_concurrent_updates_are_all_counted() -> None:
    import threading

    registry = Registry()
    counter = registry.counter("demo_hits_total", "Hits.", ("worker",))
    hist = registry.histogram("demo_lat_seconds", "Latency.", (0.5,))

    def work(name: str) -> None:
        for _ in range(5000):
            counter.inc(worker=name)
            hist.observe(0.25)

    threads = [threading.Thread(target=work, args=(str(i % 2),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parsed = parse_exposition(registry.exposition())
    assert parsed.value("demo_hits_total", worker="0") == 20000
    assert parsed.value("demo_hits_total", worker="1") == 20000
    assert parsed.value("demo_lat_seconds_count") == 40000
    assert parsed.value("demo_lat_seconds_bucket", le="0.5") == 40000


@pytest.mark.parametrize(
    "make",
    [
        lambda r: r.counter("1bad", "x"),
        lambda r: r.counter("bad-name", "x"),
        lambda r: r.counter("ok_total", "x", ("__reserved",)),
        lambda r: r.counter("ok_total", "x", ("a", "a")),
        lambda r: r.histogram("ok_seconds", "x", (1.0,), ("le",)),
        lambda r: r.histogram("ok_seconds", "x", (2.0, 1.0)),
        lambda r: r.histogram("ok_seconds", "x", ()),
    ],
)
def test_invalid_metric_definitions_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make(Registry())


def test_counters_refuse_to_go_down_and_labels_must_match() -> None:
    registry = Registry()
    counter = registry.counter("demo_total", "x", ("code",))
    with pytest.raises(ValueError):
        counter.inc(-1, code="OK")
    with pytest.raises(ValueError):
        counter.inc(1)
    with pytest.raises(ValueError):
        counter.inc(1, code="OK", extra="no")
    with pytest.raises(ValueError):
        registry.counter("demo_total", "registered twice")
    assert counter.value(code="OK") == 0


def test_runtime_gauges_count_every_state_and_a_broken_source_spares_the_rest() -> None:
    @dataclass
    class Record:
        state: str

    pods = [Record("ready"), Record("ready"), Record("notready")]
    containers = [Record("running"), Record("exited"), Record("exited"), Record("created")]
    own = PycriMetrics()
    own.watch_runtime(lambda: pods, lambda: containers)
    own.registry.add_collector(lambda: [][0])  # raises IndexError at every scrape
    parsed = parse_exposition(own.registry.exposition())
    assert {lab["state"]: v for lab, v in parsed.series("pycri_pods")} == {"ready": 2, "notready": 1}
    assert {lab["state"]: v for lab, v in parsed.series("pycri_containers")} == {
        "created": 1,
        "running": 1,
        "exited": 2,
        "unknown": 0,
    }
    assert parsed.types["process_cpu_seconds_total"] == "counter"


def test_process_metrics_describe_this_process() -> None:
    own = PycriMetrics()
    before = parse_exposition(own.registry.exposition())
    read_end, write_end = os.pipe()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    try:
        after = parse_exposition(own.registry.exposition())
    finally:
        os.close(read_end)
        os.close(write_end)
    assert after.value("process_open_fds") == before.value("process_open_fds") + 2
    assert after.value("process_cpu_seconds_total") >= before.value("process_cpu_seconds_total") + 0.15
    rss_kib = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    assert after.value("process_resident_memory_bytes") == pytest.approx(rss_kib * 1024, rel=0.2)
    # procps' elapsed time since start is an independent account of the same instant.
    elapsed = subprocess.run(
        ["ps", "-o", "etimes=", "-p", str(os.getpid())], capture_output=True, text=True, check=True
    ).stdout
    assert after.value("process_start_time_seconds") == pytest.approx(time.time() - int(elapsed), abs=2)


# --- the address -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("[::1]:1", ("::1", 1)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_addresses_are_parsed(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == expected
    assert config_from_dict({"metrics_address": text}).metrics_address == text


@pytest.mark.parametrize(
    "text",
    [
        "9090",
        "127.0.0.1",
        ":9090",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "metrics.example:9090",
        "::1:9090",
        "[::1]",
        "127.0.0.1:-1",
    ],
)
def test_bad_addresses_are_invalid_argument_naming_the_key(text: str) -> None:
    with pytest.raises(InvalidArgument, match="metrics_address"):
        config_from_dict({"metrics_address": text})
    with pytest.raises(InvalidArgument, match="metrics_address"):
        load_config(Path("/dev/null"), {"metrics_address": text})


def test_metrics_are_off_by_default_and_a_flag_overrides_the_file(tmp_path: Path) -> None:
    assert Config().metrics_address == ""
    config = tmp_path / "pycri.toml"
    config.write_text('metrics_address = "127.0.0.1:9100"\n')
    assert load_config(config, {}).metrics_address == "127.0.0.1:9100"
    assert load_config(config, {"metrics_address": "127.0.0.1:9200"}).metrics_address == "127.0.0.1:9200"
    assert load_config(config, {"metrics_address": ""}).metrics_address == ""
    with pytest.raises(InvalidArgument, match="metrics_address"):
        config_from_dict({"metrics_address": 9090})


# --- the HTTP endpoint ------------------------------------------------------------------------------


async def _exchange(port: int, request: bytes, *, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10) if read else b""
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _headers(answer: bytes) -> dict[str, str]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def test_endpoint_serves_get_metrics_and_refuses_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.5)
    registry = Registry()
    registry.counter("demo_scrapes_total", "x").inc(7)

    async def scenario() -> dict[str, object]:
        server = MetricsServer(registry, "127.0.0.1", 0)
        await server.start()
        port = server.port
        try:
            out: dict[str, object] = {}
            out["get"] = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            out["query"] = await _exchange(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            out["head"] = await _exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            out["other"] = await _exchange(port, b"GET /debug HTTP/1.1\r\n\r\n")
            out["post"] = await _exchange(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            out["garbage"] = await _exchange(port, b"hello\r\n\r\n")
            out["huge"] = await _exchange(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
            # A client that never finishes its request is dropped after the read timeout.
            started = time.monotonic()
            out["slow"] = await _exchange(port, b"GET /metrics HTTP/1.1\r\n")
            out["slow_seconds"] = time.monotonic() - started
            out["after"] = await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            return out
        finally:
            await server.stop()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)

    out = asyncio.run(scenario())
    get = out["get"]
    assert isinstance(get, bytes) and _status(get) == 200
    headers = _headers(get)
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    body = get.split(b"\r\n\r\n", 1)[1]
    assert int(headers["content-length"]) == len(body)
    assert parse_exposition(body.decode()).value("demo_scrapes_total") == 7
    assert _status(out["query"]) == 200  # type: ignore[arg-type]
    head = out["head"]
    assert isinstance(head, bytes) and _status(head) == 200 and head.endswith(b"\r\n\r\n")
    assert _status(out["other"]) == 404  # type: ignore[arg-type]
    post = out["post"]
    assert isinstance(post, bytes) and _status(post) == 405 and _headers(post)["allow"] == "GET, HEAD"
    assert _status(out["garbage"]) == 400  # type: ignore[arg-type]
    assert _status(out["huge"]) == 431  # type: ignore[arg-type]
    assert _status(out["slow"]) == 408  # type: ignore[arg-type]
    assert 0.4 <= out["slow_seconds"] < 3  # type: ignore[operator]
    assert _status(out["after"]) == 200  # type: ignore[arg-type]


def test_a_busy_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def scenario() -> None:
            await metrics.start_server(f"127.0.0.1:{port}", Registry())

        with pytest.raises(Exception, match=f"metrics_address 127.0.0.1:{port}: cannot listen"):
            asyncio.run(scenario())


def test_an_empty_address_starts_nothing() -> None:
    assert asyncio.run(metrics.start_server("", Registry())) is None


# --- a real daemon -------------------------------------------------------------------------------------

VERSION = "/runtime.v1.RuntimeService/Version"
CONTAINER_STATUS = "/runtime.v1.RuntimeService/ContainerStatus"
PULL = "/runtime.v1.ImageService/PullImage"


def scrape(port: int) -> Parsed:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        parsed = parse_exposition(resp.read().decode())
    check_histograms(parsed)
    return parsed


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (from its socket inodes and /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def metrics_image(registry: ImageRegistry) -> tuple[str, Image]:
    image = Image.build([busybox_layer(), layer_from_files([("hello.txt", "metrics\n")])], cmd=["sh"])
    push_image(registry, "test/metrics", "1", image)
    return f"{registry.host}/test/metrics:1", image


@pytest.fixture
def metrics_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    bridge = f"pyt{secrets.token_hex(3)}"
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    workdir = tmp_path / "pycri"
    workdir.mkdir()
    port = free_port()
    daemon = Daemon(
        workdir,
        f'[network]\nconf_dir = "{net_dir}"\npod_subnet = "198.18.122.0/24"\nbridge = "{bridge}"\n',
        extra_args=["--metrics-address", f"127.0.0.1:{port}"],
    )
    try:
        daemon.start()
        yield daemon, port
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        force_cleanup(daemon)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@pytest.mark.root
def test_daemon_counts_rpcs_pulls_pods_and_containers(
    metrics_daemon: tuple[Daemon, int], metrics_image: tuple[str, Image]
) -> None:
    daemon, port = metrics_daemon
    assert daemon.process is not None and port in listening_ports(daemon.process.pid)
    ref, image = metrics_image
    first = scrape(port)
    with daemon.client() as cri:
        for _ in range(3):
            cri.version()
        with pytest.raises(grpc.RpcError) as err:
            cri.container_status("no-such-container")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert cri.pull(ref) == image.config_digest
        middle = scrape(port)
        pod = cri.run_pod("metrics-pod", host_network=True, log_directory=str(daemon.workdir / "logs"))
        created = cri.create_container(pod, "idle", ref, command=["sleep", "300"], log_path="idle.log")
        running = cri.create_container(pod, "busy", ref, command=["sleep", "300"], log_path="busy.log")
        cri.start_container(running)
        with_pod = scrape(port)
        cri.stop_pod(pod)
        stopped = scrape(port)
        cri.remove_pod(pod)
        assert created not in {c.id for c in cri.list_containers()}
    gone = scrape(port)

    # Every RPC is counted by method and code; the daemon's own readiness probe made one Version.
    requests = "pycri_grpc_requests_total"
    assert (
        middle.value(requests, method=VERSION, code="OK") - first.value(requests, method=VERSION, code="OK")
        == 3
    )
    assert middle.value(requests, method=CONTAINER_STATUS, code="NOT_FOUND") == 1
    assert middle.value(requests, method=CONTAINER_STATUS, code="OK") == 0
    assert middle.value(requests, method=PULL, code="OK") == 1
    durations = "pycri_grpc_request_duration_seconds_count"
    assert middle.value(durations, method=VERSION) == middle.value(requests, method=VERSION, code="OK")
    assert middle.value("pycri_grpc_request_duration_seconds_bucket", method=VERSION, le="60") == (
        middle.value(durations, method=VERSION)
    )
    assert middle.value("pycri_grpc_request_duration_seconds_sum", method=PULL) > 0
    # Buckets from 1 ms to 60 s.
    les = sorted(
        float(lab["le"])
        for lab, _ in middle.series("pycri_grpc_request_duration_seconds_bucket")
        if lab["method"] == VERSION
    )
    assert les[0] == 0.001 and les[-2] == 60 and les[-1] == math.inf

    # The pull: its bytes (at least the layers the manifest lists), its result and its duration.
    assert first.value("pycri_image_pull_bytes_total") == 0
    assert {lab["result"]: v for lab, v in first.series("pycri_image_pulls_total")} == {
        "success": 0,
        "failure": 0,
        "cancelled": 0,
    }
    layer_bytes = sum(layer.size for layer in image.layers)
    assert middle.value("pycri_image_pull_bytes_total") >= layer_bytes > 0
    assert middle.value("pycri_image_pulls_total", result="success") == 1
    assert middle.value("pycri_image_pull_duration_seconds_count") == 1
    assert middle.value("pycri_image_pull_duration_seconds_sum") > 0

    # Pods and containers by state, computed at scrape time.
    assert (
        first.value("pycri_pods", state="ready") == 0
        and first.value("pycri_containers", state="running") == 0
    )
    assert with_pod.value("pycri_pods", state="ready") == 1
    assert with_pod.value("pycri_containers", state="created") == 1
    assert with_pod.value("pycri_containers", state="running") == 1
    assert (
        stopped.value("pycri_pods", state="ready") == 0 and stopped.value("pycri_pods", state="notready") == 1
    )
    assert stopped.value("pycri_containers", state="running") == 0
    assert stopped.value("pycri_containers", state="exited") == 2
    assert (
        gone.value("pycri_pods", state="notready") == 0
        and gone.value("pycri_containers", state="exited") == 0
    )

    # The daemon's own process.
    assert daemon.process is not None
    assert gone.value("process_resident_memory_bytes") > 10 * 1024 * 1024
    assert gone.value("process_open_fds") == pytest.approx(
        len(os.listdir(f"/proc/{daemon.process.pid}/fd")), abs=5
    )
    assert abs(gone.value("process_start_time_seconds") - time.time()) < 600
    assert gone.value("process_cpu_seconds_total") > 0


@pytest.mark.root
def test_failed_pull_is_counted_as_a_failure(
    metrics_daemon: tuple[Daemon, int], registry: ImageRegistry
) -> None:
    daemon, port = metrics_daemon
    with daemon.client() as cri, pytest.raises(grpc.RpcError) as err:
        cri.pull(f"{registry.host}/test/never-pushed:1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    parsed = scrape(port)
    assert parsed.value("pycri_image_pulls_total", result="failure") == 1
    assert parsed.value("pycri_image_pulls_total", result="success") == 0
    assert parsed.value("pycri_grpc_requests_total", method=PULL, code="NOT_FOUND") == 1
    assert parsed.value("pycri_image_pull_duration_seconds_count") == 1


@pytest.mark.root
def test_daemon_stops_serving_metrics_on_shutdown(metrics_daemon: tuple[Daemon, int]) -> None:
    daemon, port = metrics_daemon
    scrape(port)
    assert daemon.stop() == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


@pytest.mark.root
def test_daemon_without_the_flag_listens_on_no_metrics_port(daemon: Daemon) -> None:
    assert daemon.process is not None
    pid = daemon.process.pid
    events = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    streaming_ports = {
        int(e["url"].rsplit(":", 1)[1]) for e in events if e.get("event") == "streaming server"
    }
    assert len(streaming_ports) == 1, "the streaming server's port is in the log"
    # Only the streaming server listens on TCP.
    assert listening_ports(pid) == streaming_ports
    assert not [e for e in events if e.get("event") == "metrics server"]


@pytest.mark.root
def test_daemon_refuses_a_bad_metrics_address_and_a_busy_port(tmp_path: Path) -> None:
    bad = Daemon(tmp_path / "bad", extra_args=["--metrics-address", "0.0.0.0"])
    bad.workdir.mkdir()
    with pytest.raises(RuntimeError, match="metrics_address"):
        bad.start(timeout=20)
    assert bad.process is not None and bad.process.returncode == 2
    assert not bad.socket.exists()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = Daemon(tmp_path / "busy", extra_args=["--metrics-address", f"127.0.0.1:{port}"])
        busy.workdir.mkdir()
        try:
            with pytest.raises(RuntimeError, match=f"metrics_address 127.0.0.1:{port}: cannot listen"):
                busy.start(timeout=20)
            assert busy.process is not None and busy.process.returncode == 2
            assert not busy.socket.exists()
        finally:
            busy.kill()
            force_cleanup(busy)


@pytest.mark.root
def test_pull_cut_off_by_its_deadline_is_counted_as_cancelled(metrics_daemon: tuple[Daemon, int]) -> None:
    daemon, port = metrics_daemon
    big = random_layer(4 * 1024 * 1024, seed=12)
    image = Image.build([busybox_layer(), big], cmd=["sh"])
    fake = FakeRegistry()
    try:
        manifest = image.manifest_bytes("oci")
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": image.manifest_digest("oci")}
        fake.routes["/v2/slow/app/manifests/1"] = Route(headers=headers, body=manifest)
        fake.routes[f"/v2/slow/app/blobs/{image.config_digest}"] = Route(body=image.config_bytes())
        for layer in image.layers:
            fake.routes[f"/v2/slow/app/blobs/{layer.digest}"] = Route(body=layer.blob)
        # The big layer sends its first 64 KiB, then stalls past the deadline.
        fake.routes[f"/v2/slow/app/blobs/{big.digest}"] = Route(
            body=fake.stall(first=big.blob[:65536]), content_length=len(big.blob)
        )
        with daemon.client() as cri, pytest.raises(grpc.RpcError) as err:
            cri.pull(f"{fake.host}/slow/app:1", timeout=1.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        fake.close()

    def counted() -> Parsed | None:
        parsed = scrape(port)
        return parsed if parsed.value("pycri_image_pulls_total", result="cancelled") else None

    parsed = wait_for(counted, timeout=15)
    assert parsed is not None, "the cancelled pull was never counted"
    assert parsed.value("pycri_image_pulls_total", result="cancelled") == 1
    assert parsed.value("pycri_image_pulls_total", result="success") == 0
    assert parsed.value("pycri_image_pulls_total", result="failure") == 0
    assert parsed.value("pycri_image_pull_duration_seconds_count") == 1
    # What arrived before the cut-off was received all the same: metadata and the first 64 KiB.
    assert parsed.value("pycri_image_pull_bytes_total") >= 65536 + len(manifest)
