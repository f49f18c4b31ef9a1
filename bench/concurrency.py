"""Concurrency: the section "concurrency" of ``make bench`` (issue 11).

Both daemons up at once, each on its own pod network (as in sections 4 and 6), kubelet-like
requests from :class:`bench.pods.Kubelet`, runc on both, one CRI client (one gRPC channel,
as kubelet has). Each phase runs on one runtime at a time (order alternating between phases)
and removes what it made before the next begins:

1. **stops**: for each N of ``--concurrency-stops`` (default 10; issue 11 also asks for 100),
   N running containers (``--containers-per-pod`` per pod) whose shell ignores SIGTERM
   (``trap '' TERM``; "ready" in the CRI log once the trap is set). An idle pod start
   (RunPodSandbox + CreateContainer + StartContainer of ``sleep 3600``) is timed
   ``--idle-starts`` times (median) with them running; then N StopContainer(timeout=
   ``--stop-timeout``) calls are released at once from N threads and, 1 s later, one more
   pod start is timed while they wait out their grace period. Reported: that start, its
   ratio to the idle median (target ≤ 1.5), and when the last stop returned (target ≤
   timeout + 1 s).
2. **execs**: ``--concurrency-execs`` running containers, one ExecSync(``sleep
   --exec-seconds``, timeout 30) in each, all at once; the same idle and ~1 s-in pod starts.
3. **reads**: ``--concurrency-containers`` running containers; after ``--idle-seconds``
   (4) ``--read-calls`` sequential calls each (after 20 untimed) of ContainerStatus and
   PodSandboxStatus (cycling over the containers / pods), ImageStatus (busybox by name),
   ListImages, ListContainers: p50, p99 (target: pycri's p50 ≤ 1.2 x containerd's).
4. **idle CPU**, on those same containers before the reads: utime + stime (from
   ``/proc/<pid>/stat``) over ``--idle-seconds`` with nobody calling, of the daemon alone
   and of the daemon plus its per-container processes (``Runtime.infra_processes()``:
   pycri's conmons and catatonits, containerd's shims and pause processes), in % of one
   core (target: pycri < 1 % and ≤ containerd).
5. **lifecycle** (critest-style): ``--concurrency-pods`` pods of one container by
   ``--concurrency-workers`` threads, then ``--serial-pods`` pods one at a time; each pod
   RunPodSandbox, CreateContainer, StartContainer, (untimed: its "ready"), StopContainer(2),
   RemoveContainer, StopPodSandbox, RemovePodSandbox, each call timed: the median per call
   (target at parallelism 10: every call ≤ containerd; CreateContainer and RemoveContainer
   also at parallelism 1).

Results go to ``results[<runtime>]["concurrency"]``; :func:`table_rows` gives the report rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import grpcfloor, pods
from bench.measure import median, percentile, read_cpu_ticks
from bench.recovery import Subject, leftovers_after_stop
from bench.runtimes import PodNetwork, Runtime
from cri_runtime.daemon.client import CRIClient
from cri_runtime.host import cgroups
from tests.support.registry import Registry

# PID 1 of these ignores SIGTERM outright: only the SIGKILL after the grace period ends it.
IGNORE_TERM = ["sh", "-c", "trap '' TERM; echo ready; sleep 3600"]
PROBE_DELAY = 1.0  # seconds between releasing the stops / execs and the timed pod start
SLOW_RATIO = 1.5  # pod start under load vs idle
STOP_SLACK = 1.0  # seconds past the stop timeout that all stops may take
READ_RATIO = 1.2
IDLE_CPU_TARGET = 1.0  # % of one core
EXEC_TIMEOUT = 30
LIFECYCLE_STOP_TIMEOUT = 2
WARMUP_CALLS = 20
SETTLE = 3.0
PHASES = (
    ("run_pod", "RunPodSandbox"),
    ("create", "CreateContainer"),
    ("start", "StartContainer"),
    ("stop_container", "StopContainer(2)"),
    ("remove_container", "RemoveContainer"),
    ("stop_pod", "StopPodSandbox"),
    ("remove_pod", "RemovePodSandbox"),
)
# Calls that must be no slower than containerd's at parallelism 1 as well.
STRICT_PHASES = ("create", "remove_container")
READS = (
    ("container_status", "ContainerStatus"),
    ("pod_status", "PodSandboxStatus"),
    ("image_status", "ImageStatus"),
    ("list_images", "ListImages"),
    ("list_containers", "ListContainers"),
)

MakeRuntime = Callable[[str, Path, pods.PodImages], Runtime]


def log(msg: str) -> None:
    pods.log(msg)


# The section's parts, in the order they run (--concurrency-phases picks some).
SECTION_PHASES = ("stops", "execs", "reads", "lifecycle")


def add_args(p: argparse.ArgumentParser) -> None:
    """This section's options, on bench.run's parser."""
    p.add_argument(
        "--concurrency-stops",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        default=[10],
        metavar="N[,N...]",
        help="containers stopped at once, one run per N (default 10; issue 11 also asks for 100)",
    )
    p.add_argument("--stop-timeout", type=int, default=20, help="their StopContainer timeout (default 20)")
    p.add_argument("--concurrency-execs", type=int, default=20, help="concurrent ExecSync calls (default 20)")
    p.add_argument("--exec-seconds", type=int, default=10, help="each ExecSync runs sleep N (default 10)")
    p.add_argument(
        "--idle-starts", type=int, default=3, help="idle pod starts before each load; median (default 3)"
    )
    p.add_argument(
        "--concurrency-containers",
        type=int,
        default=100,
        help="running containers for the read-latency and idle-CPU tests (default 100)",
    )
    p.add_argument("--read-calls", type=int, default=300, help="timed calls of each read RPC (default 300)")
    p.add_argument("--idle-seconds", type=float, default=20.0, help="idle CPU window (default 20)")
    p.add_argument(
        "--concurrency-pods", type=int, default=100, help="pods in the parallel lifecycle (default 100)"
    )
    p.add_argument(
        "--concurrency-workers", type=int, default=10, help="threads in the parallel lifecycle (default 10)"
    )
    p.add_argument(
        "--serial-pods", type=int, default=20, help="pods in the lifecycle at parallelism 1 (default 20)"
    )
    p.add_argument(
        "--concurrency-phases",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=list(SECTION_PHASES),
        metavar="PHASE[,PHASE...]",
        help=f"which phases to run, of {','.join(SECTION_PHASES)} (default all)",
    )


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    values = [
        *args.concurrency_stops,
        args.stop_timeout,
        args.concurrency_execs,
        args.exec_seconds,
        args.idle_starts,
        args.concurrency_containers,
        args.read_calls,
        args.idle_seconds,
        args.concurrency_pods,
        args.concurrency_workers,
        args.serial_pods,
    ]
    if not args.concurrency_stops or min(values) <= 0:
        p.error(
            "the --concurrency-*, --stop-timeout, --exec-seconds, --idle-*, --read-calls, --serial-pods "
            "options must be positive"
        )
    unknown = sorted(set(args.concurrency_phases) - set(SECTION_PHASES))
    if unknown or not args.concurrency_phases:
        p.error(f"--concurrency-phases takes some of {','.join(SECTION_PHASES)}, not {unknown or 'nothing'}")
    if args.exec_seconds >= EXEC_TIMEOUT:
        p.error(f"--exec-seconds must be below the ExecSync timeout ({EXEC_TIMEOUT})")


# --- helpers ------------------------------------------------------------------------------------


def start_containers(
    kube: pods.Kubelet, count: int, per_pod: int, threads: int, prefix: str, command: list[str]
) -> tuple[list[pods.Pod], list[str]]:
    """``count`` containers running ``command`` in pods of up to ``per_pod``; their IDs."""
    sizes = [min(per_pod, count - i) for i in range(0, count, per_pod)]
    with ThreadPoolExecutor(threads) as pool:
        made = list(pool.map(lambda n: kube.start_pod(prefix, command, containers=n), sizes))
    return made, [cid for pod in made for cid in pod.containers]


def wait_ready(kube: pods.Kubelet, made: list[pods.Pod]) -> None:
    for pod in made:
        for i in range(len(pod.containers)):
            pods.wait_for_log(kube.log_file(pod, f"c{i}"), b"ready", timeout=30)


def teardown_pods(kube: pods.Kubelet, made: list[pods.Pod], threads: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(kube.teardown, made))
    return time.perf_counter() - t0


def idle_starts(kube: pods.Kubelet, runs: int) -> list[float]:
    """Pod starts (ms), each torn down right after, untimed."""
    out = []
    for _ in range(runs):
        pod = kube.start_pod("idle", pods.SLEEP)
        out.append(pod.timings["total"] * 1000)
        kube.teardown(pod)
    return out


def probe_start(kube: pods.Kubelet) -> dict[str, Any]:
    """One pod start (ms) under load; a failed one is reported with its elapsed time."""
    t0 = time.perf_counter()
    try:
        pod = kube.start_pod("probe", pods.SLEEP)
    except Exception as exc:
        return {"ms": (time.perf_counter() - t0) * 1000, "error": repr(exc), "ended": time.perf_counter()}
    return {"ms": pod.timings["total"] * 1000, "error": None, "ended": time.perf_counter(), "pod": pod}


def release_at_once(
    calls: list[Callable[[], object]],
) -> tuple[list[threading.Thread], list[dict[str, Any]], float]:
    """One thread per call, all let go together; returns the threads, their outcomes (filled
    in as they return: seconds, error) and the release time (perf_counter)."""
    go = threading.Event()
    outcomes: list[dict[str, Any]] = [{} for _ in calls]
    released = [0.0]

    def run(i: int, call: Callable[[], object]) -> None:
        go.wait()
        try:
            call()
            outcomes[i]["error"] = None
        except Exception as exc:
            outcomes[i]["error"] = repr(exc)
        outcomes[i]["seconds"] = time.perf_counter() - released[0]

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every thread waiting on the event
    released[0] = time.perf_counter()
    go.set()
    return threads, outcomes, released[0]


def under_load(kube: pods.Kubelet, calls: list[Callable[[], object]], join_timeout: float) -> dict[str, Any]:
    """Releases ``calls`` at once, times a pod start PROBE_DELAY later, waits for the calls."""
    threads, outcomes, released = release_at_once(calls)
    time.sleep(PROBE_DELAY)
    probe = probe_start(kube)
    deadline = time.monotonic() + join_timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(1 for t in threads if t.is_alive())
    done = [o for o in outcomes if "seconds" in o]
    last = max((o["seconds"] for o in done), default=math.nan)
    probe_pod = probe.pop("pod", None)
    if probe_pod is not None:
        kube.teardown(probe_pod)
    return {
        "probe_ms": probe["ms"],
        "probe_error": probe["error"],
        "probe_started_after_s": PROBE_DELAY,
        "probe_ended_after_s": probe["ended"] - released,
        # Did the probe finish while every call was still pending? (Else the load was gone.)
        "probe_within_load": bool(done) and probe["ended"] - released < min(o["seconds"] for o in done),
        "all_returned_s": last if not hung else math.nan,
        "calls_seconds": sorted(o["seconds"] for o in done),
        "errors": [o["error"] for o in done if o["error"]],
        "hung": hung,
    }


def _summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "mean_ms": sum(latencies) / len(latencies),
        "latencies_ms": latencies,
    }


def time_calls(call: Callable[[], object], calls: int) -> dict[str, Any]:
    for _ in range(WARMUP_CALLS):
        call()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    return _summary(out)


def idle_cpu(rt: Runtime, seconds: float) -> dict[str, Any]:
    """CPU (utime + stime) over ``seconds`` of the daemon and its per-container processes."""
    roles = rt.infra_processes()
    before = {pid: read_cpu_ticks(pid) for pid in roles}
    time.sleep(seconds)
    by_role: dict[str, dict[str, int]] = {}
    for pid, start in before.items():
        end = read_cpu_ticks(pid)
        role = roles[pid].split(" (")[0]
        entry = by_role.setdefault(role, {"count": 0, "ticks": 0})
        entry["count"] += 1
        if start is not None and end is not None:
            entry["ticks"] += end - start
    hz = os.sysconf("SC_CLK_TCK")
    total = sum(v["ticks"] for v in by_role.values())
    daemon = by_role.get("daemon", {}).get("ticks", 0)
    return {
        "seconds": seconds,
        "clock_ticks_per_s": hz,
        "daemon_ticks": daemon,
        "total_ticks": total,
        "daemon_percent": 100.0 * daemon / hz / seconds,
        "total_percent": 100.0 * total / hz / seconds,
        "roles": by_role,
    }


# --- phases -------------------------------------------------------------------------------------


def stops_phase(kube: pods.Kubelet, n: int, args: argparse.Namespace) -> dict[str, Any]:
    made, cids = start_containers(kube, n, args.containers_per_pod, args.pod_threads, f"ign{n}", IGNORE_TERM)
    try:
        wait_ready(kube, made)
        idle = idle_starts(kube, args.idle_starts)
        calls: list[Callable[[], object]] = [
            functools.partial(kube.client.stop_container, cid, timeout=args.stop_timeout) for cid in cids
        ]
        res = under_load(kube, calls, join_timeout=kube.client.timeout + args.stop_timeout + 30)
    finally:
        teardown = teardown_pods(kube, made, args.pod_threads)
    idle_ms = median(idle)
    return {
        "containers": n,
        "stop_timeout": args.stop_timeout,
        "idle_ms": idle,
        "idle_median_ms": idle_ms,
        "ratio_to_idle": res["probe_ms"] / idle_ms if idle_ms else math.nan,
        "teardown_seconds": teardown,
        **res,
    }


def _stops(kube: pods.Kubelet, *, n: int, args: argparse.Namespace) -> dict[str, Any]:
    return stops_phase(kube, n, args)


def execs_phase(kube: pods.Kubelet, args: argparse.Namespace) -> dict[str, Any]:
    n = args.concurrency_execs
    made, cids = start_containers(kube, n, args.containers_per_pod, args.pod_threads, "exec", pods.SLEEP)
    try:
        idle = idle_starts(kube, args.idle_starts)
        cmd = ["sleep", str(args.exec_seconds)]
        calls: list[Callable[[], object]] = [
            functools.partial(kube.client.exec_sync, cid, cmd, timeout=EXEC_TIMEOUT) for cid in cids
        ]
        res = under_load(kube, calls, join_timeout=kube.client.timeout + EXEC_TIMEOUT + 30)
    finally:
        teardown = teardown_pods(kube, made, args.pod_threads)
    idle_ms = median(idle)
    return {
        "execs": n,
        "exec_seconds": args.exec_seconds,
        "idle_ms": idle,
        "idle_median_ms": idle_ms,
        "ratio_to_idle": res["probe_ms"] / idle_ms if idle_ms else math.nan,
        "teardown_seconds": teardown,
        **res,
    }


def reads_phase(kube: pods.Kubelet, args: argparse.Namespace) -> dict[str, Any]:
    n, per_pod = args.concurrency_containers, args.containers_per_pod
    t0 = time.perf_counter()
    made, cids = start_containers(kube, n, per_pod, args.pod_threads, "read", pods.SLEEP)
    setup = time.perf_counter() - t0
    client = kube.client
    try:
        pods.expect_running(client, len(made), n)
        time.sleep(SETTLE)
        cpu = idle_cpu(kube.runtime, args.idle_seconds)
        next_cid = itertools.cycle(cids).__next__
        next_pod = itertools.cycle([p.pod_id for p in made]).__next__
        reads = {
            "container_status": time_calls(lambda: client.container_status(next_cid()), args.read_calls),
            "pod_status": time_calls(lambda: client.pod_status(next_pod()), args.read_calls),
            "image_status": time_calls(lambda: client.image_status(kube.image), args.read_calls),
            "list_images": time_calls(client.list_images, args.read_calls),
            "list_containers": time_calls(client.list_containers, args.read_calls),
        }
    finally:
        teardown = teardown_pods(kube, made, args.pod_threads)
    return {
        "containers": n,
        "pods": len(made),
        "setup_seconds": setup,
        "teardown_seconds": teardown,
        "idle_cpu": cpu,
        "reads": reads,
    }


def grpc_floor(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The read RPCs' floor: an empty Python gRPC server, the same client and call loop."""
    with grpcfloor.empty_server(work / "floor.sock") as endpoint:
        client = CRIClient(endpoint)
        try:
            out = {
                "image_status": time_calls(lambda: client.image_status("floor"), args.read_calls),
                "list_images": time_calls(client.list_images, args.read_calls),
            }
        finally:
            client.close()
    log(
        "empty Python gRPC server: ImageStatus p50 "
        f"{out['image_status']['p50_ms']:.2f} ms, ListImages p50 {out['list_images']['p50_ms']:.2f} ms"
    )
    return out


def lifecycle_one(kube: pods.Kubelet, prefix: str) -> dict[str, float]:
    """One pod of one container, start to removal, every call timed (seconds)."""
    client = kube.client
    pod = kube.new_pod(prefix)
    config = kube.container_config(pod, "c0", pods.TRAP)
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[key] = now - t
        t = now

    pod.pod_id = client.run_pod(pod.name, config=pod.config)
    lap("run_pod")
    cid = client.create_container(pod.pod_id, "", "", config=config, sandbox_config=pod.config)
    pod.containers.append(cid)
    lap("create")
    client.start_container(cid)
    lap("start")
    pods.wait_for_log(kube.log_file(pod, "c0"), b"ready", timeout=30)  # the trap is set
    t = time.perf_counter()
    client.stop_container(cid, timeout=LIFECYCLE_STOP_TIMEOUT)
    lap("stop_container")
    client.remove_container(cid)
    lap("remove_container")
    client.stop_pod(pod.pod_id)
    lap("stop_pod")
    client.remove_pod(pod.pod_id)
    lap("remove_pod")
    kube.forget(pod)
    return times


def lifecycle_run(kube: pods.Kubelet, count: int, workers: int, prefix: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        runs = list(pool.map(lambda _: lifecycle_one(kube, prefix), range(count)))
    wall = time.perf_counter() - t0
    return {
        "pods": count,
        "workers": workers,
        "wall_seconds": wall,
        "medians_ms": {key: median([r[key] for r in runs]) * 1000 for key, _ in PHASES},
        "p99_ms": {key: percentile([r[key] * 1000 for r in runs], 99) for key, _ in PHASES},
        "runs": runs,
    }


def lifecycle_phase(kube: pods.Kubelet, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "parallel": lifecycle_run(kube, args.concurrency_pods, args.concurrency_workers, "par"),
        "serial": lifecycle_run(kube, args.serial_pods, 1, "ser"),
    }


# --- the section --------------------------------------------------------------------------------


@dataclass
class _Side:
    subject: Subject
    failed: bool = False
    phase_errors: list[str] = field(default_factory=list)


def concurrency_bench(
    args: argparse.Namespace,
    work: Path,
    reg: Registry,
    names: list[str],
    results: dict[str, dict[str, Any]],
    errors: list[str],
    *,
    make_runtime: MakeRuntime,
    networks: dict[str, PodNetwork],
    iptables_rules: Callable[[], set[str]],
    routes_overlapping: Callable[[str, set[str]], list[str]],
) -> None:
    """results[name]["concurrency"]; every pod, daemon, bridge and cgroup gone on return.

    ``make_runtime``, ``iptables_rules`` and ``routes_overlapping`` are bench.run's, so the
    daemons run and the host is checked exactly as in the pods section."""
    for name in names:
        net = networks[name]
        clash = routes_overlapping(net.subnet, {net.bridge})
        if clash:
            raise RuntimeError(f"{name}'s pod subnet {net.subnet} is in use: {clash}")
    work.mkdir(parents=True, exist_ok=True)
    images = pods.build_and_push_pod_images(reg)
    iptables_before = iptables_rules()
    sides: list[_Side] = []

    def fail(side: _Side, what: str, exc: BaseException, fatal: bool = False) -> None:
        s = side.subject
        msg = f"{s.name} concurrency {what}: {exc!r}"
        tail = s.rt.log_tail(15)
        errors.append(msg + (f"\n    daemon log tail:\n{tail}" if tail else ""))
        s.out.setdefault("errors", []).append(msg)
        side.failed = side.failed or fatal
        log(f"{msg} FAILED")
        if s.kube is not None:  # whatever the phase left
            errors.extend(s.kube.teardown_all(args.pod_threads))

    def remove_cgroup_root() -> None:
        try:
            cgroups.remove(pods.CGROUP_ROOT)
        except OSError as exc:
            errors.append(f"concurrency: cannot remove {pods.CGROUP_ROOT}: {exc!r}")

    def stop(side: _Side) -> None:
        s = side.subject
        t = time.monotonic()
        if s.kube is not None:
            errors.extend(s.kube.teardown_all(args.pod_threads))
            s.kube.client.close()
        try:
            s.rt.stop()
        except Exception as exc:
            errors.append(f"{s.name} concurrency: stop: {exc!r}")
        errors.extend(f"{s.name} concurrency cleanup: {e}" for e in getattr(s.rt, "cleanup_errors", []))
        log(f"{s.name} (concurrency) stopped and cleaned up in {time.monotonic() - t:.1f}s")

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(remove_cgroup_root)  # last: once every runtime and process is gone
        for name in names:
            out = results[name].setdefault("concurrency", {})
            side = _Side(Subject(name, make_runtime(name, work, images), out))
            sides.append(side)
            cleanup.callback(stop, side)
            try:
                side.subject.rt.start()
                side.subject.kube = pods.prepare(
                    side.subject.rt,
                    side.subject.rt.client(),
                    images,
                    work / f"{name}-kubelet",
                    networks[name].subnet,
                )
                log(f"{name} ready for the concurrency tests")
            except Exception as exc:
                fail(side, "start", exc, fatal=True)

        chosen = set(args.concurrency_phases)
        phases: list[tuple[str, Callable[[pods.Kubelet], dict[str, Any]]]] = []
        if "stops" in chosen:
            phases += [
                (f"stops_{n}", functools.partial(_stops, n=n, args=args)) for n in args.concurrency_stops
            ]
        if "execs" in chosen:
            phases.append(("execs", lambda kube: execs_phase(kube, args)))
        if "reads" in chosen:
            phases.append(("reads", lambda kube: reads_phase(kube, args)))
        if "lifecycle" in chosen:
            phases.append(("lifecycle", lambda kube: lifecycle_phase(kube, args)))
        for i, (key, phase) in enumerate(phases):
            live = [s for s in sides if not s.failed]
            for side in live if i % 2 == 0 else live[::-1]:
                s = side.subject
                assert s.kube is not None
                t0 = time.monotonic()
                try:
                    res = phase(s.kube)
                except Exception as exc:
                    fail(side, key, exc)
                    continue
                s.out[key] = res
                log(f"{s.name} concurrency {key} ({time.monotonic() - t0:.0f}s): {_brief(key, res)}")
                time.sleep(1.0)
        if "reads" in chosen and "pycri" in results:
            results["pycri"]["concurrency"]["grpc_floor"] = grpc_floor(work, args)
        # Cleanup runs here: what is left torn down through CRI, daemons stopped, cgroup root.

    for side in sides:
        s = side.subject
        left = leftovers_after_stop(s, networks[s.name])
        if left:
            errors.append(f"{s.name} concurrency: left on the host after stop: {left}")
            s.out.setdefault("errors", []).append(f"leftovers: {left}")
    marks = (
        "CNI-",
        *(n.subnet.rsplit(".", 1)[0] + "." for n in networks.values()),
        *(n.bridge for n in networks.values()),
    )
    added = sorted(r for r in iptables_rules() - iptables_before if any(m in r for m in marks))
    if added:
        errors.append(f"concurrency: iptables rules left behind: {added}")
    for side in sides:
        side.subject.out["iptables_rules_added"] = added


def _brief(key: str, res: dict[str, Any]) -> str:
    if key.startswith("stops_") or key == "execs":
        extra = f"; {len(res['errors'])} errors, {res['hung']} hung" if res["errors"] or res["hung"] else ""
        return (
            f"idle start {res['idle_median_ms']:.0f} ms, start during load {res['probe_ms']:.0f} ms "
            f"({res['ratio_to_idle']:.2f}x{'; ' + res['probe_error'] if res['probe_error'] else ''}); "
            f"all calls returned after {res['all_returned_s']:.1f}s{extra}"
        )
    if key == "reads":
        cpu = res["idle_cpu"]
        return (
            f"{res['containers']} containers set up in {res['setup_seconds']:.1f}s; idle CPU daemon "
            f"{cpu['daemon_percent']:.2f}%, with helpers {cpu['total_percent']:.2f}%; p50 "
            + ", ".join(f"{label} {res['reads'][k]['p50_ms']:.2f}" for k, label in READS)
            + " ms"
        )
    par, ser = res["parallel"], res["serial"]
    return (
        f"{par['pods']} pods x {par['workers']} workers in {par['wall_seconds']:.1f}s, "
        f"{ser['pods']} serial in {ser['wall_seconds']:.1f}s"
    )


# --- report -------------------------------------------------------------------------------------


def table_rows(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for bench.run's table, as keyword arguments of its ``Row``."""
    py = results.get("pycri", {}).get("concurrency", {})
    cd = results.get("containerd", {}).get("concurrency", {})
    rows: list[dict[str, Any]] = []

    def get(res: dict[str, Any], *path: str) -> Any:
        value: Any = res
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    def row(metric: str, path: tuple[str, ...], digits: int = 0, target: str = "—", met: Any = None) -> None:
        rows.append(
            {
                "metric": metric,
                "pycri": get(py, *path),
                "containerd": get(cd, *path),
                "target": target,
                "met": met,
                "digits": digits,
            }
        )

    def at_most(value: Any, limit: float) -> bool | None:
        # NaN: the calls never all returned, or nothing to compare with: not met.
        return None if value is None else bool(not math.isnan(value) and value <= limit)

    def vs_cd(path: tuple[str, ...], limit: float) -> bool | None:
        a, b = get(py, *path), get(cd, *path)
        return None if a is None or b is None or not b else a / b <= limit

    def under_load_rows(key: str, label: str, limit_s: float | None) -> None:
        if not py.get(key) and not cd.get(key):
            return
        row(f"{label}: pod start ~{PROBE_DELAY:.0f} s in (ms)", (key, "probe_ms"))
        row(f"  … idle pod start just before, median of {args.idle_starts} (ms)", (key, "idle_median_ms"))
        ratio = get(py, key, "ratio_to_idle")
        row(
            "  … pod start under load / idle (x)",
            (key, "ratio_to_idle"),
            digits=2,
            target=f"≤ {SLOW_RATIO}",
            met=at_most(ratio, SLOW_RATIO),
        )
        last = get(py, key, "all_returned_s")
        row(
            "  … all calls returned after (s)",
            (key, "all_returned_s"),
            digits=1,
            target="—" if limit_s is None else f"≤ {limit_s:.0f}",
            met=None if limit_s is None else at_most(last, limit_s),
        )
        failures = {
            name: (len(res[key]["errors"]) + res[key]["hung"] + (1 if res[key]["probe_error"] else 0))
            for name, res in (("pycri", py), ("containerd", cd))
            if res.get(key)
        }
        rows.append(
            {
                "metric": "  … failed calls (errors + hung + failed pod start)",
                "pycri": None if "pycri" not in failures else float(failures["pycri"]),
                "containerd": None if "containerd" not in failures else float(failures["containerd"]),
                "target": "0",
                "met": None if "pycri" not in failures else failures["pycri"] == 0,
                "digits": 0,
            }
        )

    timeout = args.stop_timeout
    for n in args.concurrency_stops:
        under_load_rows(
            f"stops_{n}",
            f"{n} StopContainer({timeout}) at once, SIGTERM ignored",
            timeout + STOP_SLACK,
        )
    under_load_rows("execs", f"{args.concurrency_execs} ExecSync(sleep {args.exec_seconds}) at once", None)

    n = args.concurrency_containers
    if py.get("reads") or cd.get("reads"):
        for key, label in READS:
            path = ("reads", "reads", key, "p50_ms")
            row(
                f"{label}, {n} running containers: p50 of {args.read_calls} (ms)",
                path,
                digits=2,
                target=f"≤ {READ_RATIO}x containerd",
                met=vs_cd(path, READ_RATIO),
            )
            row("  … p99 (ms)", ("reads", "reads", key, "p99_ms"), digits=2)
        secs = args.idle_seconds
        for key, label in (
            ("daemon_percent", "daemon alone"),
            ("total_percent", "daemon + per-container processes"),
        ):
            cpu_path = ("reads", "idle_cpu", key)
            value = get(py, *cpu_path)
            other = get(cd, *cpu_path)
            ok = at_most(value, IDLE_CPU_TARGET)
            if ok is not None and other is not None:
                ok = ok and value <= other
            row(
                f"idle CPU, {n} running containers, {secs:.0f} s, {label} (% of a core)",
                cpu_path,
                digits=2,
                target=f"< {IDLE_CPU_TARGET:.0f} and ≤ containerd",
                met=ok,
            )
        setup = f"  … set-up of the {n} containers, {args.pod_threads} threads (s)"
        row(setup, ("reads", "setup_seconds"), 1)
        for key, label in (("image_status", "ImageStatus"), ("list_images", "ListImages")):
            floor = get(py, "grpc_floor", key, "p50_ms")
            if floor is not None:
                rows.append(
                    {
                        "metric": f"  … floor: an empty Python gRPC server, {label} p50 (ms; pycri column)",
                        "pycri": floor,
                        "containerd": get(cd, "reads", "reads", key, "p50_ms"),
                        "target": "—",
                        "met": None,
                        "digits": 2,
                    }
                )

    for mode, workers, pods_n in (
        ("parallel", args.concurrency_workers, args.concurrency_pods),
        ("serial", 1, args.serial_pods),
    ):
        if not get(py, "lifecycle", mode) and not get(cd, "lifecycle", mode):
            continue
        row(
            f"lifecycle, {pods_n} pods x 1 container, parallelism {workers}: wall time (s)",
            ("lifecycle", mode, "wall_seconds"),
            digits=1,
        )
        for key, label in PHASES:
            path = ("lifecycle", mode, "medians_ms", key)
            strict = mode == "parallel" or key in STRICT_PHASES
            row(
                f"  … {label}, median (ms)",
                path,
                digits=1,
                target="≤ containerd" if strict else "—",
                met=vs_cd(path, 1.0) if strict else None,
            )
    return rows
