"""Measuring helpers: RSS sampling, registry access-log accounting, percentiles."""

from __future__ import annotations

import math
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def read_status_kib(pid: int, key: str) -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (``VmRSS``, ``VmHWM``), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples ``VmRSS`` of one process every ``interval`` seconds in a thread; keeps the max.

    ``with RssSampler(pid) as s: ...`` then ``s.peak_mib``.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while True:
            value = read_status_kib(self.pid, "VmRSS")
            if value is not None:
                self.samples += 1
                self.peak_kib = max(self.peak_kib, value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # One last sample, so a peak right at the end is not lost.
        value = read_status_kib(self.pid, "VmRSS")
        if value is not None:
            self.peak_kib = max(self.peak_kib, value)

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


# --- registry access log -------------------------------------------------------------------

# distribution's access log is Apache combined format, e.g. (one line)
# 127.0.0.1 - - [28/Nov/2025:01:00:00 +0000]
#   "GET /v2/bench/big/blobs/sha256:ab..?ns=x HTTP/1.1" 200 41943552 "" "ua"
_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>/v2/(?P<repo>[^ "?]+?)/blobs/(?P<digest>sha256:[0-9a-f]{64})[^ "]*) '
    r'HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)'
)


@dataclass(frozen=True)
class BlobFetch:
    method: str
    repo: str
    digest: str
    status: int
    bytes: int


@dataclass
class RegistryLogWindow:
    """Blob requests the registry logged between ``mark()`` and ``read()``."""

    path: Path
    offset: int = 0
    fetches: list[BlobFetch] = field(default_factory=list)

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def read(self, settle: float = 0.3) -> list[BlobFetch]:
        # The registry writes each access-log line when the response is done; give the last
        # one a moment to land.
        time.sleep(settle)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            text = fh.read().decode("utf-8", errors="replace")
        out = []
        for line in text.splitlines():
            m = _ACCESS.search(line)
            if m is None:
                continue
            size = m.group("bytes")
            out.append(
                BlobFetch(
                    m.group("method"),
                    m.group("repo"),
                    m.group("digest"),
                    int(m.group("status")),
                    0 if size == "-" else int(size),
                )
            )
        self.fetches = out
        return out


def blob_gets(fetches: list[BlobFetch]) -> list[BlobFetch]:
    """Successful blob GETs (HEADs and errors do not move content)."""
    return [f for f in fetches if f.method == "GET" and f.status in (200, 206)]


# --- statistics -------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# --- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    state: str
    argv: tuple[bytes, ...]


def read_proc(pid: int) -> Proc | None:
    """One process from ``/proc``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = tuple(fh.read().split(b"\0")[:-1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm, _, rest = stat.partition("(")[2].rpartition(")")
    fields = rest.split()
    return Proc(pid, int(fields[1]), comm, fields[0], argv)


def process_table() -> dict[int, Proc]:
    """Every live (non-zombie) process, by PID."""
    table: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            proc = read_proc(int(entry.name))
            if proc is not None and proc.state != "Z":
                table[proc.pid] = proc
    return table


def children_of(table: dict[int, Proc]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for proc in table.values():
        out.setdefault(proc.ppid, []).append(proc.pid)
    return out


def descendants(pid: int, table: dict[int, Proc]) -> list[int]:
    kids = children_of(table)
    found: list[int] = []
    todo = list(kids.get(pid, []))
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(kids.get(current, []))
    return found


def environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return marker in fh.read()
    except OSError:
        return False


def read_pss_kib(pid: int) -> int | None:
    """``Pss`` from ``/proc/<pid>/smaps_rollup`` in KiB (shared pages split between their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def read_cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[11]) + int(fields[12])
