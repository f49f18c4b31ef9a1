"""Prometheus metrics: a small registry, the text exposition format 0.0.4, and an HTTP endpoint.

Off unless ``metrics_address`` is set. Counters and histograms are updated as RPCs and pulls
happen (a lock and a few additions each); gauges of pods, containers and the process are
computed when scraped. The endpoint serves ``GET /metrics`` and nothing else, closes every
connection after one answer, and drops a client that is slow to send its request or to read
the answer, so that a scraper cannot hold pycri's event loop or its memory.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, get_args

import structlog

from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.runtime.state import ContainerState, SandboxState
from cri_runtime.streaming import serving

log = structlog.get_logger("pycri.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A runtime's RPCs run from a map lookup (about a millisecond) to a container stop (tens of seconds).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PULL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


# --- the data model ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class Family:
    """One metric as exposed: its HELP, TYPE and samples."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: list[Sample] = field(default_factory=list)


def _check_names(name: str, labelnames: Sequence[str], reserved: Sequence[str] = ()) -> tuple[str, ...]:
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in labelnames:
        if not _LABEL_NAME.match(label) or label.startswith("__") or label in reserved:
            raise ValueError(f"metric {name}: invalid label name {label!r}")
    if len(set(labelnames)) != len(labelnames):
        raise ValueError(f"metric {name}: repeated label names {list(labelnames)}")
    return tuple(labelnames)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = _check_names(name, labelnames, ("le",) if self.kind == "histogram" else ())
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def _pairs(self, key: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.labelnames, key, strict=True))

    def collect(self) -> Family:
        raise NotImplementedError


class _Valued(_Metric):
    """One number per label set."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def collect(self) -> Family:
        with self._lock:
            items = sorted(self._values.items())
        samples = [Sample(self.name, self._pairs(key), value) for key, value in items]
        return Family(self.name, self.kind, self.help, samples)


class Counter(_Valued):
    """A count per label set that only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if not amount >= 0:  # also refuses NaN
            raise ValueError(f"counter {self.name} can only go up, not by {amount}")
        self._add(amount, labels)


class Gauge(_Valued):
    """A value per label set that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)


@dataclass
class _HistogramState:
    counts: list[int]  # per bucket, not cumulative; the last one is +Inf
    total: float = 0.0
    count: int = 0


class Histogram(_Metric):
    """Observations counted into buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or bounds != sorted(set(bounds)) or any(math.isnan(b) for b in bounds):
            raise ValueError(f"histogram {name}: buckets must be increasing and distinct, got {buckets}")
        self.buckets = tuple(bounds)
        self._states: dict[tuple[str, ...], _HistogramState] = {}
        if not self.labelnames:
            self._states[()] = self._new_state()

    def _new_state(self) -> _HistogramState:
        return _HistogramState([0] * (len(self.buckets) + 1))

    def observe(self, value: float, **labels: str) -> None:
        if math.isnan(value):
            return
        key = self._key(labels)
        # bisect_left: a value equal to a bound belongs to that bucket (le means <=).
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = self._new_state()
            state.counts[index] += 1
            state.total += value
            state.count += 1

    def collect(self) -> Family:
        with self._lock:
            items = [(k, _HistogramState(list(s.counts), s.total, s.count)) for k, s in self._states.items()]
        items.sort(key=lambda item: item[0])
        samples: list[Sample] = []
        for key, state in items:
            pairs = self._pairs(key)
            running = 0
            for bound, count in zip((*self.buckets, math.inf), state.counts, strict=True):
                running += count
                samples.append(Sample(f"{self.name}_bucket", (*pairs, ("le", format_value(bound))), running))
            samples.append(Sample(f"{self.name}_sum", pairs, state.total))
            samples.append(Sample(f"{self.name}_count", pairs, state.count))
        return Family(self.name, self.kind, self.help, samples)


Collector = Callable[[], Iterable[Family]]


class Registry:
    """Metrics that live in the process, plus collectors that compute families at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Collector] = []

    def _register(self, metric: _Metric) -> Any:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is registered twice")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        result: Counter = self._register(Counter(name, help, labelnames))
        return result

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        result: Gauge = self._register(Gauge(name, help, labelnames))
        return result

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        result: Histogram = self._register(Histogram(name, help, buckets, labelnames))
        return result

    def add_collector(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.append(collector)

    def collect(self) -> list[Family]:
        with self._lock:
            metrics = list(self._metrics.values())
            collectors = list(self._collectors)
        families = [m.collect() for m in metrics]
        for collector in collectors:
            try:
                families.extend(collector())
            except Exception as exc:  # one broken source must not take down the scrape
                log.warning("metrics collector failed", collector=repr(collector), error=repr(exc))
        return families

    def exposition(self) -> str:
        return render(self.collect())


# --- the text format ------------------------------------------------------------------------


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(families: Iterable[Family]) -> str:
    """The text exposition format 0.0.4: HELP and TYPE once per family, then its samples."""
    lines: list[str] = []
    seen: set[str] = set()
    for family in families:
        if family.name in seen:
            raise ValueError(f"metric family {family.name} appears twice")
        seen.add(family.name)
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            if sample.labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels)
                lines.append(f"{sample.name}{{{inner}}} {format_value(sample.value)}")
            else:
                lines.append(f"{sample.name} {format_value(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""


# --- process metrics (Linux /proc) ---------------------------------------------------------------


def _process_families() -> list[Family]:
    families: list[Family] = []
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    families.append(
        Family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            [Sample("process_resident_memory_bytes", (), resident_pages * os.sysconf("SC_PAGE_SIZE"))],
        )
    )
    times = os.times()
    families.append(
        Family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            [Sample("process_cpu_seconds_total", (), times.user + times.system)],
        )
    )
    families.append(
        Family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            [Sample("process_open_fds", (), len(os.listdir("/proc/self/fd")))],
        )
    )
    families.append(
        Family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            [Sample("process_start_time_seconds", (), _start_time())],
        )
    )
    return families


_start_time_cache: float | None = None


def _start_time() -> float:
    global _start_time_cache
    if _start_time_cache is None:
        with open("/proc/self/stat") as fh:
            # The command name may hold spaces and parentheses: fields count from the last ")".
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5); fields[0] is field 3
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        _start_time_cache = boot + start_ticks / os.sysconf("SC_CLK_TCK")
    return _start_time_cache


# --- pycri's metrics ------------------------------------------------------------------------


class _Records(Protocol):
    """What SandboxManager.all() and ContainerManager.all() return items of."""

    @property
    def state(self) -> str: ...


class PycriMetrics:
    """Every metric pycri exposes; one instance per daemon process (``METRICS``)."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.rpc_requests = self.registry.counter(
            "pycri_grpc_requests_total",
            "CRI gRPC requests handled, by method and status code.",
            ("method", "code"),
        )
        self.rpc_duration = self.registry.histogram(
            "pycri_grpc_request_duration_seconds",
            "Time to handle a CRI gRPC request, by method.",
            RPC_BUCKETS,
            ("method",),
        )
        self.pull_bytes = self.registry.counter(
            "pycri_image_pull_bytes_total", "Bytes received from registries while pulling images."
        )
        self.pulls = self.registry.counter(
            "pycri_image_pulls_total",
            "Image pulls finished, by result (success, failure, cancelled).",
            ("result",),
        )
        for result in ("success", "failure", "cancelled"):
            self.pulls.inc(0, result=result)  # every series exists from the start, for rate()
        self.pull_duration = self.registry.histogram(
            "pycri_image_pull_duration_seconds", "Time an image pull took, whatever its result.", PULL_BUCKETS
        )
        self.registry.add_collector(_process_families)

    # --- hooks -----------------------------------------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.inc(method=method, code=code)
        self.rpc_duration.observe(seconds, method=method)

    # ImageStore's pull observer (imageservice.store.PullObserver).
    def pull_bytes_received(self, count: int) -> None:
        self.pull_bytes.inc(count)

    def pull_finished(self, result: str, seconds: float) -> None:
        self.pulls.inc(result=result)
        self.pull_duration.observe(seconds)

    def watch_runtime(
        self, pods: Callable[[], Iterable[_Records]], containers: Callable[[], Iterable[_Records]]
    ) -> Collector:
        """Report pods and containers by state at every scrape; returns the collector to remove."""

        def collect() -> list[Family]:
            return [
                _state_family("pycri_pods", "Pod sandboxes by state.", get_args(SandboxState), pods()),
                _state_family(
                    "pycri_containers", "Containers by state.", get_args(ContainerState), containers()
                ),
            ]

        self.registry.add_collector(collect)
        return collect


def _state_family(name: str, help: str, states: Iterable[str], records: Iterable[_Records]) -> Family:
    counts = dict.fromkeys(states, 0)
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    return Family(name, "gauge", help, [Sample(name, (("state", s),), n) for s, n in sorted(counts.items())])


METRICS = PycriMetrics()


# --- the address ---------------------------------------------------------------------------------


def parse_address(text: str, key: str = "metrics_address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) with an IP address or ``localhost`` as host."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise InvalidArgument(f"{key} must be HOST:PORT such as 127.0.0.1:9090, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        bracketed = True
    else:
        bracketed = False
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise InvalidArgument(
                f"{key}: host must be an IP address or localhost, got {host!r} in {text!r}"
            ) from None
        if address.version == 6 and not bracketed:
            raise InvalidArgument(f"{key}: write an IPv6 address in brackets, as [{host}]:PORT; got {text!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidArgument(f"{key}: port must be 1-65535, got {port_text!r} in {text!r}")
    return host, int(port_text)


# --- the HTTP endpoint -----------------------------------------------------------------------------

MAX_REQUEST_BYTES = 8 * 1024
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 16


def _response(status: str, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    head = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


class MetricsServer:
    """``GET /metrics`` on ``host:port``; 404 for other paths, 405 for other methods."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise FailedPrecondition(
                f"metrics_address {self.host}:{self.port}: cannot listen: {exc}"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics server", address=self.host, port=self.port)

    async def stop(self) -> None:
        await serving.close(self._server, self._sessions)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._sessions) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._sessions.add(task)
        try:
            answer = await self._answer(reader)
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (ConnectionError, OSError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception as exc:  # one bad scrape must never take the server down
            log.warning("metrics request failed", error=repr(exc))
        finally:
            self._sessions.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _response("431 Request Header Fields Too Large", b"", "text/plain; charset=utf-8")
        except (TimeoutError, asyncio.IncompleteReadError):
            return _response("408 Request Timeout", b"", "text/plain; charset=utf-8")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._plain("400 Bad Request", "malformed request line\n")
        method, target, _ = parts
        if target.split("?", 1)[0] != "/metrics":
            return self._plain("404 Not Found", "not found; metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return self._plain("405 Method Not Allowed", "use GET\n", (("Allow", "GET, HEAD"),))
        # Collecting reads the managers' state under their locks and /proc: off the event loop.
        text = await asyncio.get_running_loop().run_in_executor(None, self.registry.exposition)
        body = text.encode()
        head_bytes = _response("200 OK", body, CONTENT_TYPE)
        return head_bytes if method == "HEAD" else head_bytes + body

    @staticmethod
    def _plain(status: str, text: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
        body = text.encode()
        return _response(status, body, "text/plain; charset=utf-8", extra) + body


async def start_server(address: str, registry: Registry | None = None) -> MetricsServer | None:
    """Serve ``registry`` (pycri's by default) on ``address``; None when the address is empty (off)."""
    if not address:
        return None
    host, port = parse_address(address)
    server = MetricsServer(registry or METRICS.registry, host, port)
    await server.start()
    return server
