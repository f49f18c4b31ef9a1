"""Recovery after ``kill -9``, and idle daemon memory: section 6 of ``make bench``.

Both daemons up at once, each on its own pod network (as in section 4), kubelet-like
requests from :class:`bench.pods.Kubelet`, busybox and the pause image from the bench's
loopback registry. For each runtime:

1. a fresh daemon, no pods, ``SETTLE_SECONDS`` idle: VmRSS and PSS of the daemon process alone;
2. ``--recovery-pods`` pods of one ``sleep 3600`` container; ``SETTLE_SECONDS`` idle: the
   daemon's VmRSS and PSS again;
3. ``--recovery-runs`` times, runtimes interleaved (order alternating), on the same pods:

   * ``len(EXIT_CODES)`` more containers, ``sh -c 'sleep 2; exit N'`` (one code each), in the
     first pods; checked running (by their processes) right before the kill;
   * SIGKILL to the daemon alone (pycri's conmons and containerd's shims keep running);
     ``DOWN_SECONDS`` later, once those containers have exited, the daemon is started again
     on the same state;
   * from that exec: the first successful ``Version``, and the first ``ListContainers`` that
     shows every container in its right state, confirmed by ``ListPodSandbox`` (every pod
     ready, no other) and a ``ContainerStatus`` of each container: the running ones RUNNING
     with their original created_at/started_at, the exited ones EXITED with their own exit
     code and a finish time between the kill and the restart.

   Once ``Version`` answered, every wrong answer is a failure, printed and kept in the
   results, even one that later corrects itself (kubelet would have acted on it); an exited
   container still reported RUNNING is merely late. A runtime that is not all correct
   ``CORRECT_TIMEOUT`` seconds after the restart fails the run. Before the next run the
   exited containers are removed (RemoveContainer after a recovery) and 5 new ones made.
4. ``SETTLE_SECONDS`` idle after the last recovery: the daemon's VmRSS and PSS;
5. StopContainer(0) + RemoveContainer of every container, StopPodSandbox + RemovePodSandbox of
   every pod; then nothing may be left: no container or pod listed, no conmon/catatonit/shim/
   pause process, and after the daemon stopped no mount under its directories, no bridge, no
   pod cgroup, no iptables rule of the pod networks.

Results go to ``results[<runtime>]["recovery"]``; :func:`table_rows` gives the report rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import pods
from bench.measure import environ_has, median, process_table, read_pss_kib, read_status_kib
from bench.runtimes import (
    CONTAINERD_BINARY,
    ContainerdRuntime,
    PodNetwork,
    PycriRuntime,
    Runtime,
    _link_exists,
    _mounts_under,
)
from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from cri_runtime.host import cgroups
from tests.support.registry import Registry

# Codes the short-lived containers exit with: none that a runtime uses for "unknown" (255,
# 137 = SIGKILL), so a guessed code cannot pass for the real one.
EXIT_CODES = (0, 3, 42, 64, 123)
EXIT_AFTER_SECONDS = 2
DOWN_SECONDS = 3.0
SETTLE_SECONDS = 5.0
READY_TARGET_MS = 2000.0
IDLE_RSS_TARGET_MIB = 60.0
START_TIMEOUT = 120.0  # from exec to Version
CORRECT_TIMEOUT = 60.0  # from exec to all correct
EXITED_TIMEOUT = 15.0  # extra wait for the short-lived containers, after DOWN_SECONDS
POLL_SECONDS = 0.01
RUNNING = pb.ContainerState.CONTAINER_RUNNING
EXITED = pb.ContainerState.CONTAINER_EXITED
MIB = 1024.0

MakeRuntime = Callable[[str, Path, pods.PodImages], Runtime]


def log(msg: str) -> None:
    pods.log(msg)


def _state(value: int) -> str:
    try:
        return str(pb.ContainerState.Name(value)).removeprefix("CONTAINER_")
    except ValueError:
        return str(value)


# --- what every container should look like -----------------------------------------------------


@dataclass
class Expected:
    label: str
    pod_id: str
    state: int
    created_at: int
    started_at: int
    exit_code: int | None = None  # the short-lived ones


@dataclass
class Subject:
    """One runtime under test and everything the bench made on it."""

    name: str
    rt: Runtime
    out: dict[str, Any]
    kube: pods.Kubelet | None = None
    pods: list[pods.Pod] = field(default_factory=list)
    expected: dict[str, Expected] = field(default_factory=dict)
    exiters: list[str] = field(default_factory=list)
    failed: bool = False


Problem = tuple[str, str]  # ("wrong" | "late", text)


def check_state(
    client: CRIClient,
    expected: dict[str, Expected],
    pod_ids: set[str],
    exited_between: tuple[int, int],
) -> tuple[bool, float, list[Problem]]:
    """(all correct?, when ListContainers answered, problems). ListPodSandbox and one
    ContainerStatus per container only once ListContainers looks right."""
    listed = client.list_containers()
    listed_at = time.perf_counter()
    problems: list[Problem] = []

    def state_problem(exp: Expected, got: int, where: str) -> None:
        late = exp.state == EXITED and got == RUNNING  # the exit not noticed yet
        problems.append(
            ("late" if late else "wrong", f"{exp.label}: {where} {_state(got)}, expected {_state(exp.state)}")
        )

    seen = {c.id: c for c in listed}
    for cid, exp in expected.items():
        container = seen.get(cid)
        if container is None:
            problems.append(("wrong", f"{exp.label}: missing from ListContainers"))
            continue
        if container.state != exp.state:
            state_problem(exp, container.state, "ListContainers says")
        if container.created_at != exp.created_at:
            problems.append(
                ("wrong", f"{exp.label}: created_at {container.created_at}, expected {exp.created_at}")
            )
        if container.pod_sandbox_id != exp.pod_id:
            problems.append(("wrong", f"{exp.label}: in pod {container.pod_sandbox_id[:12]}"))
    for cid in seen.keys() - expected.keys():
        c = seen[cid]
        problems.append(("wrong", f"unexpected container {cid[:12]} {c.metadata.name} {_state(c.state)}"))
    if problems:
        return False, listed_at, problems

    listed_pods = {p.id: p for p in client.list_pods()}
    for pod_id in sorted(pod_ids):
        pod = listed_pods.get(pod_id)
        if pod is None:
            problems.append(("wrong", f"pod {pod_id[:12]} missing from ListPodSandbox"))
        elif pod.state != pb.PodSandboxState.SANDBOX_READY:
            problems.append(("wrong", f"pod {pod.metadata.name} is {pb.PodSandboxState.Name(pod.state)}"))
    for pod_id in listed_pods.keys() - pod_ids:
        problems.append(("wrong", f"unexpected pod {pod_id[:12]} {listed_pods[pod_id].metadata.name}"))

    low, high = exited_between
    for cid, exp in expected.items():
        status = client.container_status(cid).status
        if status.state != exp.state:
            state_problem(exp, status.state, "ContainerStatus says")
            continue
        if status.started_at != exp.started_at:
            problems.append(
                ("wrong", f"{exp.label}: started_at {status.started_at}, expected {exp.started_at}")
            )
        if exp.exit_code is None:
            continue
        if status.exit_code != exp.exit_code:
            problems.append(
                (
                    "wrong",
                    f"{exp.label}: exit code {status.exit_code} ({status.reason or 'no reason'}), "
                    f"expected {exp.exit_code}",
                )
            )
        if not low <= status.finished_at <= high:
            problems.append(
                (
                    "wrong",
                    f"{exp.label}: finished_at {status.finished_at} is "
                    f"{(status.finished_at - low) / 1e9:+.3f}s from the kill, "
                    f"not between the kill and the restart ({(high - low) / 1e9:.3f}s after)",
                )
            )
    return not problems, listed_at, problems


# --- restart and probe --------------------------------------------------------------------------


@dataclass
class Probe:
    ready_at: float | None = None
    correct_at: float | None = None
    version_attempts: int = 0
    polls: int = 0
    # Distinct problems seen after Version answered: (seconds after ready, kind, text).
    problems: list[tuple[float, str, str]] = field(default_factory=list)
    last_problems: list[str] = field(default_factory=list)
    error: str = ""


def _accepts(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def probe(
    endpoint: str,
    check: Callable[[CRIClient], tuple[bool, float, list[Problem]]],
    started: float,
    cancel: threading.Event,
) -> Probe:
    """Poll until Version answers (a fresh channel each time: a channel's reconnect back-off
    would blur the moment), then until ``check`` passes."""
    result = Probe()
    path = endpoint.removeprefix("unix://")
    while True:
        if cancel.is_set():
            result.error = "cancelled before Version answered"
            return result
        if time.perf_counter() - started > START_TIMEOUT:
            result.error = f"Version did not answer within {START_TIMEOUT:.0f}s"
            return result
        if _accepts(path):
            result.version_attempts += 1
            try:
                with CRIClient(endpoint, timeout=5) as client:
                    client.version()
                result.ready_at = time.perf_counter()
                break
            except grpc.RpcError:
                pass
        time.sleep(POLL_SECONDS)
    seen: set[str] = set()
    with CRIClient(endpoint, timeout=30) as client:
        while not cancel.is_set():
            result.polls += 1
            try:
                ok, listed_at, problems = check(client)
            except grpc.RpcError as exc:
                ok, listed_at = False, time.perf_counter()
                problems = [("wrong", f"RPC failed after Version answered: {exc.code()} {exc.details()}")]
            if ok:
                result.correct_at = listed_at
                return result
            for kind, text in problems:
                if text not in seen and len(seen) < 200:
                    seen.add(text)
                    result.problems.append((listed_at - result.ready_at, kind, text))
            result.last_problems = [f"{kind}: {text}" for kind, text in problems]
            if time.perf_counter() - started > CORRECT_TIMEOUT:
                result.error = f"not all correct {CORRECT_TIMEOUT:.0f}s after the restart"
                return result
            time.sleep(POLL_SECONDS)
    result.error = "cancelled"
    return result


def _daemon_process(rt: Runtime) -> subprocess.Popen[bytes]:
    proc = rt.daemon.process if isinstance(rt, PycriRuntime) else getattr(rt, "process", None)
    if proc is None:
        raise RuntimeError(f"{rt.name}: no daemon process")
    return proc


def kill_daemon(rt: Runtime) -> None:
    """SIGKILL to the daemon process alone (not its group)."""
    proc = _daemon_process(rt)
    if proc.poll() is not None:
        raise RuntimeError(f"{rt.name} had already exited ({proc.returncode}):\n{rt.log_tail(15)}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _spawn(rt: Runtime) -> None:
    """Start the daemon again on its state, from this (the main) thread: containerd runs
    under ``setpriv --pdeathsig``, which fires when the forking *thread* ends.

    pycri: tests.support.daemon's own start, which returns once Version answers;
    containerd: what ContainerdRuntime.start does minus claiming the bridge (its pods still
    use it) and re-recording which host directories existed before the bench."""
    if isinstance(rt, PycriRuntime):
        rt.daemon.start(timeout=START_TIMEOUT)
        return
    assert isinstance(rt, ContainerdRuntime)
    prefix = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
    with open(rt.log_path, "ab") as log_file:
        rt.process = subprocess.Popen(
            [*prefix, CONTAINERD_BINARY, "--config", str(rt.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=rt.base,
        )


def _pycri_state_restored_ms(rt: Runtime, offset: int) -> float | None:
    """pycri's own "state restored" ``ms`` from its JSON log, written after ``offset``."""
    if not isinstance(rt, PycriRuntime):
        return None
    try:
        with open(rt.daemon.log_path, "rb") as fh:
            fh.seek(offset)
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if b"state restored" not in line:
            continue
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "state restored":
                return float(event["ms"])
    return None


def _log_size(rt: Runtime) -> int:
    path = rt.daemon.log_path if isinstance(rt, PycriRuntime) else getattr(rt, "log_path", None)
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def restart_and_probe(s: Subject, exited_after_ns: int) -> tuple[Probe, int, float | None]:
    """Start the killed daemon; (probe, wall-clock ns of the exec, pycri's own recovery ms)."""
    assert s.kube is not None
    cancel = threading.Event()
    offset = _log_size(s.rt)
    pod_ids = {p.pod_id for p in s.pods}
    window = [exited_after_ns, 0]  # the upper end is the restart, set below

    def check(client: CRIClient) -> tuple[bool, float, list[Problem]]:
        return check_state(client, s.expected, pod_ids, (window[0], window[1]))

    with ThreadPoolExecutor(1, thread_name_prefix="probe") as pool:
        restart_ns = time.time_ns()
        window[1] = restart_ns
        started = time.perf_counter()
        future = pool.submit(probe, s.rt.endpoint, check, started, cancel)
        try:
            _spawn(s.rt)
            result = future.result(timeout=START_TIMEOUT + CORRECT_TIMEOUT + 30)
        except BaseException:
            cancel.set()
            raise
    # Times relative to the exec.
    if result.ready_at is not None:
        result.ready_at -= started
    if result.correct_at is not None:
        result.correct_at -= started
    # The old channel points at the killed daemon; kubelet reconnects too.
    old, s.kube.client = s.kube.client, s.rt.client()
    old.close()
    return result, restart_ns, _pycri_state_restored_ms(s.rt, offset)


# --- phases -------------------------------------------------------------------------------------


def daemon_memory(rt: Runtime) -> dict[str, float]:
    """VmRSS, PSS and VmHWM of the daemon process alone, in MiB."""
    pid = rt.pid
    return {
        "rss_mib": (read_status_kib(pid, "VmRSS") or 0) / MIB,
        "pss_mib": (read_pss_kib(pid) or 0) / MIB,
        "hwm_mib": (read_status_kib(pid, "VmHWM") or 0) / MIB,
    }


def setup_pods(s: Subject, count: int, threads: int) -> float:
    """``count`` pods of one ``sleep 3600`` container; their expected state recorded."""
    assert s.kube is not None
    made, seconds = pods.create_many(s.kube, count, 1, threads, "rec")
    s.pods = made
    client = s.kube.client
    pods.expect_running(client, count, count)
    for pod in made:
        cid = pod.containers[0]
        status = client.container_status(cid).status
        if status.state != RUNNING or not status.started_at:
            raise RuntimeError(f"{s.name}: {pod.name}/c0 is {_state(status.state)} right after the start")
        s.expected[cid] = Expected(
            f"{pod.name}/c0", pod.pod_id, RUNNING, status.created_at, status.started_at
        )
    return seconds


def _marker_pids(markers: list[str]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {m: [] for m in markers}
    wanted = {m.encode(): m for m in markers}
    for proc in process_table().values():
        for arg in proc.argv:
            if arg in wanted:
                found[wanted[arg]].append(proc.pid)
    return found


def start_exiters(s: Subject, run: int) -> list[str]:
    """Remove the last run's exited containers; start ``len(EXIT_CODES)`` new short-lived
    ones in the first pods. Returns their process markers (``$0`` of their shell)."""
    assert s.kube is not None
    client = s.kube.client
    for cid in s.exiters:
        client.remove_container(cid)
        s.expected.pop(cid, None)
    s.exiters = []
    markers: list[str] = []
    for i, code in enumerate(EXIT_CODES):
        pod = s.pods[i % len(s.pods)]
        name = f"exit-{run}-{i}"
        marker = f"pycri-bench-exiter-{s.name}-{run}-{i}"
        command = ["sh", "-c", f"sleep {EXIT_AFTER_SECONDS}; exit {code}", marker]
        config = s.kube.container_config(pod, name, command)
        cid = client.create_container(pod.pod_id, "", "", config=config, sandbox_config=pod.config)
        s.exiters.append(cid)
        client.start_container(cid)
        status = client.container_status(cid).status
        if status.state != RUNNING:
            raise RuntimeError(f"{s.name}: {pod.name}/{name} is {_state(status.state)} right after the start")
        s.expected[cid] = Expected(
            f"{pod.name}/{name} (exit {code})", pod.pod_id, EXITED, status.created_at, status.started_at, code
        )
        markers.append(marker)
    return markers


def recovery_run(s: Subject, run: int) -> dict[str, Any]:
    """One kill -9 / restart cycle; raises when the daemon cannot be brought back."""
    markers = start_exiters(s, run)
    alive = _marker_pids(markers)
    if not all(alive.values()):
        raise RuntimeError(f"{s.name}: short-lived containers not running at kill time: {alive}")
    kill_ns = time.time_ns()
    kill_daemon(s.rt)
    time.sleep(DOWN_SECONDS)
    waited = 0.0
    while any(_marker_pids(markers).values()):
        if waited > EXITED_TIMEOUT:
            raise RuntimeError(
                f"{s.name}: short-lived containers still running {DOWN_SECONDS + waited:.0f}s after the kill"
            )
        time.sleep(0.1)
        waited += 0.1
    if waited:
        time.sleep(0.2)  # their monitor writes the exit status right after
    result, restart_ns, own_ms = restart_and_probe(s, kill_ns)
    wrong = [f"+{t * 1000:.0f}ms {text}" for t, kind, text in result.problems if kind == "wrong"]
    late = [f"+{t * 1000:.0f}ms {text}" for t, kind, text in result.problems if kind == "late"]
    return {
        "run": run,
        "down_seconds": (restart_ns - kill_ns) / 1e9,
        "ready_ms": None if result.ready_at is None else result.ready_at * 1000,
        "correct_ms": None if result.correct_at is None else result.correct_at * 1000,
        "pycri_state_restored_ms": own_ms,
        "version_attempts": result.version_attempts,
        "polls": result.polls,
        "wrong": wrong,
        "late": late,
        "last_problems": result.last_problems[:50],
        "error": result.error,
        "ok": not wrong and not result.error and result.correct_at is not None,
    }


def teardown(s: Subject, threads: int) -> tuple[float, list[str]]:
    """StopContainer(0) + RemoveContainer of every container, StopPodSandbox +
    RemovePodSandbox of every pod; then check nothing is listed and no per-pod process is left."""
    assert s.kube is not None
    errors: list[str] = []
    client = s.kube.client
    started = time.perf_counter()

    def one(container: pb.Container) -> None:
        try:
            client.stop_container(container.id, timeout=0)
            client.remove_container(container.id)
        except Exception as exc:
            errors.append(f"{s.name}: stop/remove {container.metadata.name} {container.id[:12]}: {exc!r}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, client.list_containers()))
    errors += s.kube.teardown_all(threads)
    seconds = time.perf_counter() - started
    left_c, left_p = client.list_containers(), client.list_pods()
    if left_c or left_p:
        errors.append(
            f"{s.name}: {len(left_c)} containers and {len(left_p)} pods still listed after teardown"
        )
    deadline = time.monotonic() + 15
    while True:
        stray = {p: role for p, role in s.rt.infra_processes().items() if not role.startswith("daemon")}
        if not stray or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if stray:
        errors.append(
            f"{s.name}: processes left after teardown: {sorted(set(stray.values()))} {sorted(stray)}"
        )
    return seconds, errors


def leftovers_after_stop(s: Subject, network: PodNetwork) -> list[str]:
    """What a stopped runtime left on the host: processes, mounts, the bridge, pod cgroups."""
    found: list[str] = []
    if isinstance(s.rt, PycriRuntime):
        dirs = [s.rt.daemon.workdir]
    else:
        assert isinstance(s.rt, ContainerdRuntime)
        dirs = [s.rt.base, s.rt.run_dir]
    markers = [str(d).encode() for d in dirs]
    for proc in process_table().values():
        if proc.pid == os.getpid():
            continue
        if any(m in arg for arg in proc.argv for m in markers) or any(
            environ_has(proc.pid, b"PYCRI_SANDBOX=" + m) for m in markers if proc.comm == "catatonit"
        ):
            found.append(f"process {proc.pid} {proc.comm}")
    found += [f"mount {m}" for m in _mounts_under(dirs)]
    if _link_exists(network.bridge):
        found.append(f"bridge {network.bridge}")
    for pod in s.pods:
        found += [f"cgroup {d}" for d in pod.cgroup_dirs if d.exists()]
    return found


def recovery_bench(
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
    """Section 6: results[name]["recovery"]; every pod, daemon, bridge and cgroup gone on return.

    ``make_runtime``, ``iptables_rules`` and ``routes_overlapping`` are bench.run's, so this
    section runs its daemons and checks the host exactly as the pods section does."""
    for name in names:
        net = networks[name]
        clash = routes_overlapping(net.subnet, {net.bridge})
        if clash:
            raise RuntimeError(f"{name}'s pod subnet {net.subnet} is in use: {clash}")
    work.mkdir(parents=True, exist_ok=True)
    images = pods.build_and_push_pod_images(reg)
    iptables_before = iptables_rules()
    subjects: list[Subject] = []

    def fail(s: Subject, what: str, exc: BaseException) -> None:
        msg = f"{s.name} recovery {what}: {exc!r}"
        tail = s.rt.log_tail(15)
        errors.append(msg + (f"\n    daemon log tail:\n{tail}" if tail else ""))
        s.out.setdefault("errors", []).append(msg)
        s.failed = True
        log(f"{msg} FAILED")

    def remove_cgroup_root() -> None:
        try:
            cgroups.remove(pods.CGROUP_ROOT)
        except OSError as exc:
            errors.append(f"recovery: cannot remove {pods.CGROUP_ROOT}: {exc!r}")

    def stop(s: Subject) -> None:
        t = time.monotonic()
        try:
            s.rt.stop()
        except Exception as exc:
            errors.append(f"{s.name} recovery: stop: {exc!r}")
        errors.extend(f"{s.name} recovery cleanup: {e}" for e in getattr(s.rt, "cleanup_errors", []))
        log(f"{s.name} (recovery) stopped and cleaned up in {time.monotonic() - t:.1f}s")

    def finish(s: Subject) -> None:
        """Teardown through CRI while the daemon runs; else rt.stop() force-cleans."""
        if s.kube is None:
            return
        try:
            if _daemon_process(s.rt).poll() is None:
                seconds, problems = teardown(s, args.pod_threads)
                s.out["teardown_seconds"] = seconds
                errors.extend(problems)
                s.out.setdefault("errors", []).extend(problems)
        except Exception as exc:
            errors.append(f"{s.name} recovery teardown: {exc!r}")
        finally:
            s.kube.client.close()

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(remove_cgroup_root)  # last: once every runtime and process is gone
        for name in names:
            out = results[name].setdefault("recovery", {})
            s = Subject(name, make_runtime(name, work, images), out)
            subjects.append(s)
            cleanup.callback(stop, s)
            cleanup.callback(finish, s)
            try:
                s.rt.start()
            except Exception as exc:
                fail(s, "start", exc)

        def live() -> list[Subject]:
            return [s for s in subjects if not s.failed]

        time.sleep(SETTLE_SECONDS)
        for s in live():
            s.out["idle_fresh"] = daemon_memory(s.rt)
            log(f"{s.name}: fresh daemon, no pods, idle: {_fmt_mem(s.out['idle_fresh'])}")

        for s in live():
            try:
                s.kube = pods.prepare(
                    s.rt, s.rt.client(), images, work / f"{s.name}-kubelet", networks[s.name].subnet
                )
                s.out["setup_seconds"] = setup_pods(s, args.recovery_pods, args.pod_threads)
                log(f"{s.name}: {args.recovery_pods} pods running (set up in {s.out['setup_seconds']:.1f}s)")
            except Exception as exc:
                fail(s, "set-up", exc)

        time.sleep(SETTLE_SECONDS)
        for s in live():
            s.out["idle_pods"] = {"pods": args.recovery_pods, **daemon_memory(s.rt)}
            log(f"{s.name}: {args.recovery_pods} pods, idle: {_fmt_mem(s.out['idle_pods'])}")

        total = args.recovery_pods + len(EXIT_CODES)
        for run in range(args.recovery_runs):
            order = live() if run % 2 == 0 else live()[::-1]
            for s in order:
                try:
                    res = recovery_run(s, run)
                except Exception as exc:
                    fail(s, f"run {run}", exc)
                    continue
                s.out.setdefault("runs", []).append(res)
                own = res["pycri_state_restored_ms"]
                log(
                    f"{s.name} recovery run {run}: down {res['down_seconds']:.1f}s; exec to Version "
                    f"{_ms(res['ready_ms'])}, to all {total} correct {_ms(res['correct_ms'])}"
                    + (f" (pycri's own 'state restored': {own:.0f} ms)" if own is not None else "")
                    + f"; {res['version_attempts']} Version attempts, {res['polls']} list polls"
                )
                if not res["ok"]:
                    lines = list(res["wrong"])
                    if res["error"] and res["last_problems"]:
                        lines += ["still, at the end:", *res["last_problems"]]
                    msg = (
                        f"{s.name} recovery run {run}: NOT ALL {total} CONTAINERS REPORTED CORRECTLY"
                        + (f" ({res['error']})" if res["error"] else "")
                        + ":\n      "
                        + "\n      ".join(lines[:40])
                    )
                    errors.append(msg)
                    log("!" * 30 + " " + msg)
                elif res["late"]:
                    log(f"{s.name} run {run}: late (not wrong) after Version: {res['late'][:5]}")

        if live():
            time.sleep(SETTLE_SECONDS)
        for s in live():
            s.out["idle_after_recovery"] = {"pods": args.recovery_pods, **daemon_memory(s.rt)}
            mem = _fmt_mem(s.out["idle_after_recovery"])
            log(f"{s.name}: {args.recovery_pods} pods, after recovery, idle: {mem}")
        # Cleanup runs here: teardown through CRI and its checks, daemons stopped, cgroup root.

    for s in subjects:
        left = leftovers_after_stop(s, networks[s.name])
        if left:
            errors.append(f"{s.name} recovery: left on the host after stop: {left}")
            s.out.setdefault("errors", []).append(f"leftovers: {left}")
    marks = (
        "CNI-",
        *(n.subnet.rsplit(".", 1)[0] + "." for n in networks.values()),
        *(n.bridge for n in networks.values()),
    )
    added = sorted(r for r in iptables_rules() - iptables_before if any(m in r for m in marks))
    if added:
        errors.append(f"recovery: iptables rules left behind: {added}")
    for s in subjects:
        s.out["iptables_rules_added"] = added


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _fmt_mem(mem: dict[str, float]) -> str:
    return f"VmRSS {mem['rss_mib']:.1f} MiB, PSS {mem['pss_mib']:.1f} MiB"


# --- report -------------------------------------------------------------------------------------


def table_rows(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for bench.run's table, as keyword arguments of its ``Row``."""
    py = results.get("pycri", {}).get("recovery", {})
    cd = results.get("containerd", {}).get("recovery", {})
    n, runs = args.recovery_pods, args.recovery_runs
    total = n + len(EXIT_CODES)

    def med(res: dict[str, Any], key: str) -> float | None:
        values = [r[key] for r in res.get("runs", []) if r.get(key) is not None]
        return median(values) if values else None

    def correct(res: dict[str, Any]) -> str | None:
        done = res.get("runs", [])
        if not done and not res.get("errors"):
            return None
        bad = [r["run"] for r in done if not r["ok"]]
        if bad or len(done) < runs:
            return f"no: {len(done) - len(bad)}/{runs} runs"
        return "yes"

    def mem(res: dict[str, Any], phase: str, key: str) -> float | None:
        m = res.get(phase)
        return float(m[key]) if m else None

    ready_py = med(py, "ready_ms")
    ok_py = correct(py)
    fresh_py = mem(py, "idle_fresh", "rss_mib")
    return [
        {
            "metric": f"recovery after kill -9 ({n} running + {len(EXIT_CODES)} exited containers): "
            f"exec to first Version, median of {runs} (ms)",
            "pycri": ready_py,
            "containerd": med(cd, "ready_ms"),
            "target": f"< {READY_TARGET_MS:.0f}",
            "met": None if ready_py is None else ready_py < READY_TARGET_MS,
            "digits": 0,
        },
        {
            "metric": f"  … exec to ListContainers with all {total} correct "
            "(RUNNING + started_at, EXITED + exit code), median (ms)",
            "pycri": med(py, "correct_ms"),
            "containerd": med(cd, "correct_ms"),
            "digits": 0,
        },
        {
            "metric": f"  … all {total} containers and {n} pods reported correctly, every run",
            "pycri": ok_py,
            "containerd": correct(cd),
            "target": "yes",
            "met": None if ok_py is None else ok_py == "yes",
        },
        {
            "metric": "  … pycri's own 'state restored' time, median (ms)",
            "pycri": med(py, "pycri_state_restored_ms"),
            "containerd": None,
            "digits": 0,
        },
        {
            "metric": "idle daemon VmRSS, fresh start, no pods (MiB)",
            "pycri": fresh_py,
            "containerd": mem(cd, "idle_fresh", "rss_mib"),
            "target": f"< {IDLE_RSS_TARGET_MIB:.0f}",
            "met": None if fresh_py is None else fresh_py < IDLE_RSS_TARGET_MIB,
            "digits": 1,
        },
        {
            "metric": "  … PSS (MiB)",
            "pycri": mem(py, "idle_fresh", "pss_mib"),
            "containerd": mem(cd, "idle_fresh", "pss_mib"),
            "digits": 1,
        },
        {
            "metric": f"idle daemon VmRSS, {n} pods running (MiB)",
            "pycri": mem(py, "idle_pods", "rss_mib"),
            "containerd": mem(cd, "idle_pods", "rss_mib"),
            "digits": 1,
        },
        {
            "metric": "  … PSS (MiB)",
            "pycri": mem(py, "idle_pods", "pss_mib"),
            "containerd": mem(cd, "idle_pods", "pss_mib"),
            "digits": 1,
        },
        {
            "metric": f"  … VmRSS after the last recovery, {n} pods (MiB)",
            "pycri": mem(py, "idle_after_recovery", "rss_mib"),
            "containerd": mem(cd, "idle_after_recovery", "rss_mib"),
            "digits": 1,
        },
    ]
