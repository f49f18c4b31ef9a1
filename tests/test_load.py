"""Two hundred clients at once, for minutes: does pycri keep up, account for everything and leak nothing?

Each client is a thread with its own CRIClient (its own gRPC channel) that loops the life of a
pod kubelet would drive: RunPodSandbox, CreateContainer (from the busybox test image),
StartContainer, StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox. The stops are
mixed as on a node: a third of the clients run a container that ignores SIGTERM and stop it with a
2 s timeout (it is killed when the timeout ends), a third one that exits on SIGTERM, stopped with a
10 s timeout, the rest ``sleep`` stopped at once (timeout 0). No iteration starts once the time is
up (``PYCRI_LOAD_SECONDS``, default 120; the first 10 s are a warm-up).

Every answer must be OK. Afterwards nothing is listed and nothing is left on the host (mounts,
namespace pins, pod cgroups, conmon and pod init processes, bridge ports, IP allocations), the
daemon's open file descriptors and threads are back at what they were after the warm-up, and its
resident memory (VmRSS) is within 10% of the value after the warm-up. The figures are printed
(``pytest -s``) and written to a JSON file whose path is printed too.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cri_runtime.daemon.client import CRIClient
from cri_runtime.host.mounts import mounts_under
from tests.support.daemon import Daemon, bridge_ports, force_cleanup
from tests.support.host import processes_of
from tests.support.images import Image, busybox_layer, push_image
from tests.support.pods import pod_cgroups_on_host
from tests.support.registry import Registry

pytestmark = pytest.mark.root

SUBNET = "198.18.124.0/24"
CLIENTS = 200
# (command, StopContainer timeout) by client index modulo 3.
WORKLOADS = (
    (["sh", "-c", "trap '' TERM; while :; do sleep 1; done"], 2),
    (["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"], 10),
    (["sleep", "1000"], 0),
)
SECONDS = float(os.environ.get("PYCRI_LOAD_SECONDS", "120"))
WARMUP_SECONDS = 10.0
OPS_PER_ITERATION = 7
RSS_GROWTH_LIMIT = 0.10


@dataclass
class Figures:
    rss_kib: int
    fds: int
    threads: int


def daemon_figures(daemon: Daemon) -> Figures:
    assert daemon.process is not None
    pid = daemon.process.pid
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return Figures(
        rss_kib=int(status["VmRSS"].split()[0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
    )


def settled_figures(daemon: Daemon, timeout: float = 20.0) -> Figures:
    """The daemon's figures once they stop moving (closed channels and exited helpers take a moment)."""
    previous = daemon_figures(daemon)
    deadline = time.monotonic() + timeout
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = daemon_figures(daemon)
        if (now.fds, now.threads) != (previous.fds, previous.threads):
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since >= 2.0:
            return now
        previous = now
    return previous


@dataclass
class Run:
    """What the clients of one phase did."""

    iterations: int = 0
    errors: list[str] = field(default_factory=list)
    pods: set[str] = field(default_factory=set)
    containers: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(
    endpoint: str, index: int, image: str, logs: Path, until: float, run: Run, phase: str
) -> None:
    command, stop_timeout = WORKLOADS[index % len(WORKLOADS)]
    with CRIClient(endpoint, timeout=120) as cri:
        iteration = 0
        while time.monotonic() < until:  # never start an iteration after the time is up
            name = f"load-{phase}-{index}-{iteration}"
            step = "RunPodSandbox"
            pod = cid = ""
            try:
                pod = cri.run_pod(name, uid=f"uid-{name}", log_directory=str(logs / f"client-{index}"))
                with run.lock:
                    run.pods.add(pod)
                step = "CreateContainer"
                cid = cri.create_container(pod, "sleeper", image, command=command, log_path=f"{name}.log")
                with run.lock:
                    run.containers.add(cid)
                step = "StartContainer"
                cri.start_container(cid)
                step = "StopContainer"
                cri.stop_container(cid, timeout=stop_timeout)
                step = "RemoveContainer"
                cri.remove_container(cid)
                step = "StopPodSandbox"
                cri.stop_pod(pod)
                step = "RemovePodSandbox"
                cri.remove_pod(pod)
            except grpc.RpcError as exc:
                with run.lock:
                    run.errors.append(
                        f"client {index} iteration {iteration} {step}: {exc.code().name}: {exc.details()}"
                    )
                _take_down(cri, pod)
                return
            with run.lock:
                run.iterations += 1
            iteration += 1


def _take_down(cri: CRIClient, pod: str) -> None:
    """After a failed step: leave no pod of ours behind, so the leak check judges the daemon."""
    if not pod:
        return
    for attempt in range(3):
        try:
            cri.stop_pod(pod)
            cri.remove_pod(pod)
            return
        except grpc.RpcError:
            time.sleep(1 + attempt)


def run_clients(daemon: Daemon, image: str, logs: Path, seconds: float, phase: str) -> tuple[Run, float]:
    run = Run()
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=client_loop, args=(daemon.endpoint, i, image, logs, until, run, phase), name=f"client-{i}"
        )
        for i in range(CLIENTS)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return run, time.monotonic() - started


@dataclass
class LoadEnv:
    daemon: Daemon
    image: str
    bridge: str
    tmp: Path


@pytest.fixture
def load_env(registry: Registry, daemon_factory, tmp_path: Path) -> Iterator[LoadEnv]:  # type: ignore[no-untyped-def]
    image = Image.build([busybox_layer()], cmd=["sh"], env=["PATH=/bin:/usr/bin"])
    push_image(registry, "test/load", "1", image)
    reference = f"{registry.host}/test/load:1"
    bridge = f"pyl{secrets.token_hex(4)}"
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    daemon = daemon_factory(
        'default_runtime = "runc"\n'
        f'[network]\nconf_dir = "{net_dir}"\npod_subnet = "{SUBNET}"\nbridge = "{bridge}"\n',
        name="load",
    )
    try:
        with daemon.client() as cri:
            cri.pull(reference)
        yield LoadEnv(daemon, reference, bridge, tmp_path)
    finally:
        leftovers = processes_of(daemon.workdir), mounts_under(daemon.workdir)
        daemon.stop()
        daemon.kill()
        force_cleanup(daemon)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    assert leftovers == ([], [])


def host_leftovers(env: LoadEnv, pods: set[str]) -> dict[str, list[str]]:
    state = env.daemon.state
    links = bridge_ports(env.bridge)
    ipam = state / "cni-ipam"
    allocations = (
        [
            str(p)
            for p in ipam.rglob("*")
            if p.is_file() and not p.name.startswith(("last_reserved_ip", "lock"))
        ]
        if ipam.is_dir()
        else []
    )
    return {
        "processes": processes_of(env.daemon.workdir),
        "mounts": mounts_under(env.daemon.workdir),
        "namespace pins and pod dirs": [str(p) for p in (state / "sandboxes").iterdir()],
        "container dirs": [str(p) for p in (state / "containers").iterdir()]
        + [str(p) for p in (env.daemon.root / "containers").iterdir()],
        "pod cgroups": [str(path) for pod in pods for path in pod_cgroups_on_host(pod)],
        "bridge ports": links,
        "ip allocations": allocations,
    }


@pytest.mark.timeout(int(SECONDS) + 600)
def test_two_hundred_clients_cycle_pods_and_containers_without_errors_or_leaks(load_env: LoadEnv) -> None:
    daemon = load_env.daemon
    logs = load_env.tmp / "logs"
    warmup, warmup_seconds = run_clients(daemon, load_env.image, logs, min(WARMUP_SECONDS, SECONDS), "warmup")
    assert warmup.errors == [], "\n".join(warmup.errors[:20])
    after_warmup = settled_figures(daemon)

    main_seconds = max(SECONDS - WARMUP_SECONDS, 0.0)
    main, elapsed = run_clients(daemon, load_env.image, logs, main_seconds, "main")
    with daemon.client() as cri:
        pods_left = [p.id for p in cri.list_pods()]
        containers_left = [c.id for c in cri.list_containers()]
    end = settled_figures(daemon)
    leftovers = host_leftovers(load_env, warmup.pods | main.pods)

    iterations = warmup.iterations + main.iterations
    total_seconds = warmup_seconds + elapsed
    figures = {
        "clients": CLIENTS,
        "seconds": round(total_seconds, 1),
        "iterations": iterations,
        "iterations_after_warmup": main.iterations,
        "ops": iterations * OPS_PER_ITERATION,
        "ops_per_second": round(iterations * OPS_PER_ITERATION / total_seconds, 1),
        "ops_per_second_after_warmup": round(main.iterations * OPS_PER_ITERATION / elapsed, 1)
        if elapsed
        else 0,
        "rss_kib_after_warmup": after_warmup.rss_kib,
        "rss_kib_end": end.rss_kib,
        "rss_growth": round(end.rss_kib / after_warmup.rss_kib - 1, 4),
        "fds_after_warmup": after_warmup.fds,
        "fds_end": end.fds,
        "threads_after_warmup": after_warmup.threads,
        "threads_end": end.threads,
        "errors": len(warmup.errors) + len(main.errors),
    }
    report = load_env.tmp / "load-figures.json"
    report.write_text(json.dumps(figures, indent=2) + "\n")
    print("\nload test figures:")
    for key, value in figures.items():
        print(f"  {key}: {value}")
    print(f"figures written to {report}")

    assert main.errors == [], "\n".join(main.errors[:20])
    assert main.iterations > 0 or main_seconds == 0
    assert (pods_left, containers_left) == ([], [])
    assert leftovers == {key: [] for key in leftovers}
    assert (end.fds, end.threads) == (after_warmup.fds, after_warmup.threads), figures
    assert end.rss_kib <= after_warmup.rss_kib * (1 + RSS_GROWTH_LIMIT), figures
