"""Pod and container benchmarks: pycri vs containerd, same client, kubelet-like requests.

* **start**: RunPodSandbox + CreateContainer + StartContainer of one busybox ``sleep 3600``
  container; per call and in total.
* **teardown**: StopContainer(timeout=10) + RemoveContainer + StopPodSandbox +
  RemovePodSandbox of a pod whose container ends on SIGTERM
  (``trap 'exit 0' TERM; sleep 3600 & wait``); also the container's stop + remove alone.
* **memory**: with ``--memory-pods`` pods of one container running, VmRSS (and PSS) summed
  over the daemon plus every process it keeps per pod or container that is not the
  container's workload (pycri: conmon, catatonit; containerd: shims and pause processes).
* **list**: ``--list-containers`` running containers (``--containers-per-pod`` per pod),
  then ListContainers and ListPodSandbox latency, p50/p99; with them running, the RSS and
  the idle CPU (5 s, nobody calling) of the daemon and its per-pod processes.

Requests look like kubelet's: a pod uid, labels and annotations, a log directory and a
per-container ``log_path`` (``<name>/0.log``), DNS config, a pod cgroup parent that the
bench ("kubelet") creates before RunPodSandbox and removes after RemovePodSandbox, PID
namespace CONTAINER for pod and container, masked/read-only paths, an explicit Unconfined
seccomp profile, BestEffort resources, a bind-mounted termination-log file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import percentile, read_cpu_ticks, read_pss_kib, read_status_kib
from bench.runtimes import Runtime
from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from cri_runtime.host import cgroups
from cri_runtime.oci import spec
from tests.support.images import BUSYBOX_PATH, File, Image, busybox_image, layer_from_files, push_image
from tests.support.registry import Registry

BUSYBOX_REPO = "bench/busybox"
PAUSE_REPO = "pause"
PAUSE_TAG = "3.9"
CATATONIT = Path("/usr/bin/catatonit")
NAMESPACE = "bench"
# The bench's pod cgroups (like kubelet's /kubepods): <root>/<runtime>/pod<uid>.
CGROUP_ROOT = "/pycri-bench"
# An address in the pod's resolv.conf, never contacted (sleep resolves nothing).
DNS_SERVER = "198.19.255.10"

SLEEP = ["sleep", "3600"]
# PID 1 ignores SIGTERM without a handler; this one exits 0 on it. "ready" (in the CRI log)
# says the trap is installed, so a stop never races the shell's start-up.
TRAP = ["sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 3600 & wait"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- images -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodImages:
    busybox: str
    pause: str


def build_and_push_pod_images(reg: Registry) -> PodImages:
    """busybox (tests.support.images) and a pause image: Debian's static catatonit as
    ``/pause``, entrypoint ``/pause -P``, user 65535, as ``<registry>/pause:3.9``."""
    if not BUSYBOX_PATH.exists():
        raise RuntimeError(f"{BUSYBOX_PATH} is missing (apt-get install busybox-static)")
    if not CATATONIT.exists():
        raise RuntimeError(f"{CATATONIT} is missing (apt-get install catatonit)")
    push_image(reg, BUSYBOX_REPO, "1", busybox_image(cmd=["sh"]))
    pause_layer = layer_from_files({"pause": File(CATATONIT.read_bytes(), mode=0o755)})
    pause = Image.build(
        [pause_layer],
        entrypoint=["/pause", "-P"],
        user="65535:65535",
        working_dir="/",
        labels={"org.pycri.bench": "pause"},
    )
    push_image(reg, PAUSE_REPO, PAUSE_TAG, pause)
    return PodImages(busybox=f"{reg.host}/{BUSYBOX_REPO}:1", pause=f"{reg.host}/{PAUSE_REPO}:{PAUSE_TAG}")


# --- kubelet-like requests -------------------------------------------------------------------


@dataclass
class Pod:
    """A pod the bench made: what it takes to tear it down, even after a failure."""

    name: str
    config: pb.PodSandboxConfig
    cgroup_parent: str
    cgroup_dirs: list[Path]
    pod_id: str = ""
    containers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Kubelet:
    """Builds kubelet-like requests for one runtime and keeps track of its pods."""

    def __init__(self, runtime: Runtime, client: CRIClient, work: Path, image: str, image_id: str) -> None:
        self.runtime = runtime
        self.client = client
        self.work = work  # pod logs and termination-log files live here
        self.image = image
        self.image_id = image_id
        self.label = runtime.name
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.pods: dict[str, Pod] = {}  # by name
        self.pod_ip = ""  # of the warm-up pod

    def _next(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._counter):04d}"

    def new_pod(self, prefix: str) -> Pod:
        name = self._next(prefix)
        uid = str(uuid.uuid4())
        parent = f"{CGROUP_ROOT}/{self.label}/pod{uid}"
        config = CRIClient.pod_config(
            name,
            namespace=NAMESPACE,
            uid=uid,
            hostname=name,
            log_directory=str(self.work / "pods" / f"{NAMESPACE}_{name}_{uid}"),
            labels={
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": NAMESPACE,
                "io.kubernetes.pod.uid": uid,
                "app": "bench",
            },
            pid_mode=pb.NamespaceMode.CONTAINER,
            dns_servers=[DNS_SERVER],
            dns_searches=[f"{NAMESPACE}.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            cgroup_parent=parent,
        )
        config.dns_config.options.append("ndots:5")
        config.annotations.update(
            {
                "kubernetes.io/config.seen": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "kubernetes.io/config.source": "api",
            }
        )
        # kubelet makes the pod cgroup before RunPodSandbox (and removes it after RemovePodSandbox).
        created = cgroups.create(parent)
        pod = Pod(name, config, parent, created)
        with self._lock:
            self.pods[name] = pod
        return pod

    def container_config(self, pod: Pod, name: str, command: list[str]) -> pb.ContainerConfig:
        meta = pod.config.metadata
        termination = self.work / "kubelet" / meta.uid / "containers" / name / uuid.uuid4().hex[:8]
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.touch()
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=self.image_id, user_specified_image=self.image),
            command=command,
            envs=[
                pb.KeyValue(key="POD_NAME", value=meta.name.encode()),
                pb.KeyValue(key="POD_NAMESPACE", value=meta.namespace.encode()),
                pb.KeyValue(key="KUBERNETES_SERVICE_PORT", value=b"443"),
            ],
            mounts=[pb.Mount(container_path="/dev/termination-log", host_path=str(termination))],
            labels={
                "io.kubernetes.container.name": name,
                "io.kubernetes.pod.name": meta.name,
                "io.kubernetes.pod.namespace": meta.namespace,
                "io.kubernetes.pod.uid": meta.uid,
            },
            annotations={
                "io.kubernetes.container.hash": "1c2d3e4f",
                "io.kubernetes.container.restartCount": "0",
                "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
                "io.kubernetes.container.terminationMessagePolicy": "File",
                "io.kubernetes.pod.terminationGracePeriod": "30",
            },
            log_path=f"{name}/0.log",
        )
        resources = config.linux.resources
        resources.cpu_period = 100000
        resources.cpu_shares = 2
        resources.oom_score_adj = 1000  # BestEffort
        security = config.linux.security_context
        security.namespace_options.pid = pb.NamespaceMode.CONTAINER
        # What kubelet sends for procMount: Default, the same lists as the runtime defaults.
        security.masked_paths.extend(spec.DEFAULT_MASKED_PATHS)
        security.readonly_paths.extend(spec.DEFAULT_READONLY_PATHS)
        security.seccomp.profile_type = pb.SecurityProfile.ProfileType.Unconfined
        return config

    def log_file(self, pod: Pod, container: str) -> Path:
        return Path(pod.config.log_directory) / container / "0.log"

    # --- the timed sequences -----------------------------------------------------------------

    def start_pod(self, prefix: str, command: list[str], containers: int = 1, handler: str = "") -> Pod:
        """RunPodSandbox, then Create + Start of each container; per-call wall times in
        ``pod.timings`` (the first container's)."""
        pod = self.new_pod(prefix)
        configs = [self.container_config(pod, f"c{i}", command) for i in range(containers)]
        t0 = time.perf_counter()
        pod.pod_id = self.client.run_pod(pod.name, config=pod.config, runtime_handler=handler)
        t1 = time.perf_counter()
        for i, config in enumerate(configs):
            c0 = time.perf_counter()
            cid = self.client.create_container(pod.pod_id, "", "", config=config, sandbox_config=pod.config)
            pod.containers.append(cid)
            c1 = time.perf_counter()
            self.client.start_container(cid)
            c2 = time.perf_counter()
            if i == 0:
                pod.timings.update(run_pod=t1 - t0, create=c1 - c0, start=c2 - c1, total=c2 - t0)
        return pod

    def teardown_timed(self, pod: Pod) -> dict[str, float]:
        """StopContainer(10) + RemoveContainer + StopPodSandbox + RemovePodSandbox, each timed."""
        cid = pod.containers[0]
        t0 = time.perf_counter()
        self.client.stop_container(cid, timeout=10)
        t1 = time.perf_counter()
        self.client.remove_container(cid)
        t2 = time.perf_counter()
        self.client.stop_pod(pod.pod_id)
        t3 = time.perf_counter()
        self.client.remove_pod(pod.pod_id)
        t4 = time.perf_counter()
        self.forget(pod)
        return {
            "stop_container": t1 - t0,
            "remove_container": t2 - t1,
            "stop_pod": t3 - t2,
            "remove_pod": t4 - t3,
            "container_total": t2 - t0,
            "total": t4 - t0,
        }

    def teardown(self, pod: Pod) -> None:
        """Untimed, as kubelet does it for a pod being deleted without grace."""
        pod_ids = [pod.pod_id] if pod.pod_id else []
        if not pod_ids:  # interrupted during RunPodSandbox: find it by its uid label
            selector = pb.PodSandboxFilter(label_selector={"io.kubernetes.pod.uid": pod.config.metadata.uid})
            pod_ids = [p.id for p in self.client.list_pods(selector)]
        for pod_id in pod_ids:
            self.client.stop_pod(pod_id)
            self.client.remove_pod(pod_id)
        self.forget(pod)

    def forget(self, pod: Pod) -> None:
        cgroups.remove(pod.cgroup_parent)
        with self._lock:
            self.pods.pop(pod.name, None)

    def teardown_all(self, threads: int = 4) -> list[str]:
        """Every pod still on record, best effort; returns the errors."""
        errors: list[str] = []

        def one(pod: Pod) -> None:
            try:
                self.teardown(pod)
            except Exception as exc:
                errors.append(f"{self.label} teardown {pod.name}: {exc!r}")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, list(self.pods.values())))
        return errors


def wait_for_log(path: Path, text: bytes, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if text in path.read_bytes():
                return
        time.sleep(0.01)
    raise RuntimeError(f"{path}: no {text!r} after {timeout}s")


# --- set-up and checks -----------------------------------------------------------------------


def prepare(runtime: Runtime, client: CRIClient, images: PodImages, work: Path, subnet: str) -> Kubelet:
    """Pull busybox and the pause image (containerd's sandbox image) before any timing; then
    one untimed pod cycle that checks the pod IP, the CRI log and the trap-based stop."""
    image_id = client.pull(images.busybox, timeout=300)
    client.pull(images.pause, timeout=300)
    kube = Kubelet(runtime, client, work, images.busybox, image_id)
    pod = kube.start_pod("warm", TRAP)
    wait_for_log(kube.log_file(pod, "c0"), b"ready")
    status = client.pod_status(pod.pod_id).status
    times = kube.teardown_timed(pod)
    if times["stop_container"] > 5:
        raise RuntimeError(f"{runtime.name}: SIGTERM did not end the trap container ({times})")
    kube.pod_ip = status.network.ip
    if not kube.pod_ip or ipaddress.ip_address(kube.pod_ip) not in ipaddress.ip_network(subnet):
        raise RuntimeError(f"{runtime.name}: pod IP {kube.pod_ip!r} is not in {subnet}")
    return kube


# --- phases ----------------------------------------------------------------------------------------


def latency_round(kube: Kubelet, handler: str = "") -> tuple[dict[str, float], dict[str, float]]:
    """One timed start (sleep 3600) and one timed teardown (trap container)."""
    started = kube.start_pod("start", SLEEP, handler=handler)
    start_times = dict(started.timings)
    kube.teardown(started)
    victim = kube.start_pod("stop", TRAP, handler=handler)
    wait_for_log(kube.log_file(victim, "c0"), b"ready")
    stop_times = kube.teardown_timed(victim)
    return start_times, stop_times


@dataclass
class ProcessMemory:
    roles: dict[str, dict[str, float]]  # role -> count, rss_kib, pss_kib
    rss_kib: int
    pss_kib: int
    daemon_rss_kib: int
    daemon_pss_kib: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "roles": self.roles,
            "rss_mib": self.rss_kib / 1024,
            "pss_mib": self.pss_kib / 1024,
            "daemon_rss_mib": self.daemon_rss_kib / 1024,
            "daemon_pss_mib": self.daemon_pss_kib / 1024,
            "per_pod_rss_mib": (self.rss_kib - self.daemon_rss_kib) / 1024,
            "per_pod_pss_mib": (self.pss_kib - self.daemon_pss_kib) / 1024,
        }


def infra_memory(runtime: Runtime) -> ProcessMemory:
    roles: dict[str, dict[str, float]] = {}
    total_rss = total_pss = daemon_rss = daemon_pss = 0
    for pid, role in runtime.infra_processes().items():
        rss = read_status_kib(pid, "VmRSS") or 0
        pss = read_pss_kib(pid) or 0
        entry = roles.setdefault(role, {"count": 0, "rss_kib": 0, "pss_kib": 0})
        entry["count"] += 1
        entry["rss_kib"] += rss
        entry["pss_kib"] += pss
        total_rss += rss
        total_pss += pss
        if role == "daemon":
            daemon_rss, daemon_pss = rss, pss
    return ProcessMemory(roles, total_rss, total_pss, daemon_rss, daemon_pss)


def idle_cpu_percent(runtime: Runtime, seconds: float = 5.0) -> float:
    """CPU used by the daemon and its per-pod processes while nobody calls, in % of one core."""
    pids = list(runtime.infra_processes())
    before = {pid: read_cpu_ticks(pid) for pid in pids}
    time.sleep(seconds)
    used = 0
    for pid, start in before.items():
        end = read_cpu_ticks(pid)
        if start is not None and end is not None:
            used += end - start
    return 100.0 * used / os.sysconf("SC_CLK_TCK") / seconds


def create_many(kube: Kubelet, pods: int, per_pod: int, threads: int, prefix: str) -> tuple[list[Pod], float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        made = list(pool.map(lambda _: kube.start_pod(prefix, SLEEP, containers=per_pod), range(pods)))
    return made, time.perf_counter() - started


def expect_running(client: CRIClient, pods: int, containers: int) -> None:
    listed = client.list_containers()
    running = [c for c in listed if c.state == pb.ContainerState.CONTAINER_RUNNING]
    ready = [p for p in client.list_pods() if p.state == pb.PodSandboxState.SANDBOX_READY]
    if len(running) != containers or len(ready) != pods:
        raise RuntimeError(
            f"expected {pods} ready pods and {containers} running containers, "
            f"found {len(ready)} and {len(running)} (of {len(listed)} containers)"
        )


def memory_phase(kube: Kubelet, pods: int, threads: int, settle: float = 3.0) -> dict[str, Any]:
    idle = infra_memory(kube.runtime)
    made, setup = create_many(kube, pods, 1, threads, "mem")
    expect_running(kube.client, pods, pods)
    time.sleep(settle)  # let start-up garbage settle (Go GC, Python arenas)
    loaded = infra_memory(kube.runtime)
    for pod in made:
        kube.teardown(pod)
    return {
        "pods": pods,
        "setup_seconds": setup,
        "idle": idle.as_dict(),
        **loaded.as_dict(),
    }


def _time_calls(call: Callable[[], object], calls: int) -> list[float]:
    for _ in range(20):  # warm-up, not timed
        call()
    out: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "mean_ms": sum(latencies) / len(latencies),
        "latencies_ms": latencies,
    }


def list_phase(kube: Kubelet, pods: int, per_pod: int, calls: int, threads: int) -> dict[str, Any]:
    made, setup = create_many(kube, pods, per_pod, threads, "list")
    expect_running(kube.client, pods, pods * per_pod)
    time.sleep(1.0)
    containers = _time_calls(kube.client.list_containers, calls)
    sandboxes = _time_calls(kube.client.list_pods, calls)
    memory = infra_memory(kube.runtime).as_dict()
    idle_cpu = idle_cpu_percent(kube.runtime)
    response = sum(c.ByteSize() for c in kube.client.list_containers())
    teardown_started = time.perf_counter()
    for pod in made:
        kube.teardown(pod)
    return {
        "pods": pods,
        "containers": pods * per_pod,
        "setup_seconds": setup,
        "teardown_seconds": time.perf_counter() - teardown_started,
        "list_containers": _summary(containers),
        "list_pods": _summary(sandboxes),
        "list_containers_response_bytes": response,
        "memory": memory,
        "idle_cpu_percent": idle_cpu,
    }


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    log(f"{label} took {time.monotonic() - t0:.1f}s")
