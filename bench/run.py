"""pycri vs containerd (1.6, CRI plugin), both driven by pycri's CRI client: ``make bench``.

1. Pull of a ~200 MB image of 5 incompressible layers from a loopback ``docker-registry``:
   wall time (median of ``--runs``, each on a fresh daemon with a fresh store), peak daemon
   RSS sampled every 20 ms; then RemoveImage and a check that the store is empty again.
2. A second image sharing 4 of those 5 layers, pulled right after: which blobs and how many
   bytes the registry served (from its access log).
3. ``--images`` tiny distinct images pulled in parallel, then ``--list-calls`` ListImages
   calls: p50/p99 latency.
4. Pods (``bench/pods.py``), both daemons up, kubelet-like requests, busybox from the same
   registry and containerd's sandbox image ``<registry>/pause:3.9`` (catatonit), pre-pulled:
   a. RunPodSandbox + CreateContainer + StartContainer (``sleep 3600``): median of
      ``--pods-runs``, runtimes interleaved;
   b. StopContainer(10) + RemoveContainer + StopPodSandbox + RemovePodSandbox of a container
      that exits on SIGTERM: median; and the container's stop + remove alone;
   c. ``--memory-pods`` running pods of one container: VmRSS (and PSS) of the daemon plus
      its per-pod processes (pycri: conmon, catatonit; containerd: shims, pause);
   d. ``--list-containers`` running containers: ListContainers / ListPodSandbox p50/p99.
   Both runtimes use runc for every headline figure (runc against runc); with ``--crun`` (on by
   default) a and b are measured again with crun on both sides (containerd's runc shim told to
   run crun), as rows of their own.
5. Streaming (``bench/streaming.py``, issue 4), on the same daemons, one SPDY/3.1 client:
   a. Exec ``echo hi`` (no TTY): from the Exec RPC to the exit status, median of ``--exec-runs``;
   b. PortForward: one connection downloading ``--forward-mb`` MB from busybox httpd in a pod,
      MB/s (median of ``--forward-runs``).
6. Recovery and idle memory (``bench/recovery.py``), both daemons afresh, same kind of pods:
   a. idle VmRSS/PSS of the daemon process alone, freshly started with no pods, then with
      ``--recovery-pods`` pods of one ``sleep 3600`` container (5 s idle each);
   b. ``kill -9`` of the daemon alone (conmons / shims keep running) with those pods plus 5
      containers that exit with known codes while it is down; 3 s later it is started again:
      exec to the first Version, and to the first ListContainers with every container right
      (RUNNING with its started_at, EXITED with its exit code; all checked, any wrong answer
      is an error), median of ``--recovery-runs`` cycles on the same pods.

7. Concurrency (``bench/concurrency.py``, issue 11), both daemons afresh, same kind of pods:
   a pod start while ``--concurrency-stops`` StopContainer(``--stop-timeout``) calls of
   containers ignoring SIGTERM wait, and while ``--concurrency-execs`` ExecSync calls run,
   against an idle start; read RPC p50/p99 and idle CPU (``--idle-seconds``) with
   ``--concurrency-containers`` running; per-call medians of a pod lifecycle at parallelism
   ``--concurrency-workers`` and 1.

8. Image work (``bench/imagework.py``, issue 15), pycri alone: ``pycri commit`` of a container with
   ``--commit-mb`` MiB of random changes against ``tar -czf`` + ``sha256sum`` of its upper
   directory (median of ``--commit-runs``), and an unchanged rebuild of a 5-step Containerfile.
   ``make bench-images`` runs this section only.

Sections can be left out with ``--skip-<section>`` or picked with ``--only`` (e.g.
``--only recovery`` or ``--only pods,streaming``).

Prints a markdown table (pycri | containerd | ratio pycri/containerd | target | met?) and
writes everything, raw samples included, to ``bench/results/latest.json``.
Only 127.0.0.1 and the bench's own pod networks (198.19.0.0/24 containerd, 198.19.1.0/24 pycri)
are used. Every pod, process, mount, bridge, cgroup and temp dir is cleaned up at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import concurrency, imagework, pods, recovery, streaming
from bench.images import BigImages, build_and_push_big, build_and_push_many
from bench.measure import RegistryLogWindow, RssSampler, blob_gets, median, percentile, read_status_kib
from bench.runtimes import ContainerdRuntime, PodNetwork, PycriRuntime, Runtime
from cri_runtime.host import cgroups
from tests.support.registry import Registry, start_registry

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024
RSS_TARGET_MB = 150.0
LIST_P99_TARGET_MS = 50.0
POD_LATENCY_RATIO = 0.7
POD_MEMORY_RATIO = 0.5
POD_LIST_P99_TARGET_MS = 20.0
EXEC_RATIO = 1.0
FORWARD_TARGET_MB_S = 200.0
# Headline figures compare like with like: runc under both runtimes. crun gets rows of its own.
HEADLINE_RUNTIME = "runc"
SIDE_RUNTIME = "crun"
POD_NETWORKS = {
    "containerd": PodNetwork("pycri-bench-containerd", "198.19.0.0/24", "pybcd0"),
    "pycri": PodNetwork("pycri", "198.19.1.0/24", "pybench0"),
}

RuntimeFactory = Callable[[str], Runtime]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# What --only names; each has a --skip-<section>. "pull" is tests 1 and 2.
SECTIONS = ("pull", "list", "pods", "streaming", "recovery", "concurrency", "images")


def _sections(value: str) -> list[str]:
    chosen = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or value!r}; choose from {SECTIONS}")
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--pull-mb", type=int, default=200, help="size of the big image in MiB (default 200)")
    p.add_argument("--layers", type=int, default=5, help="layers of the big image (default 5)")
    p.add_argument("--runs", type=int, default=3, help="pull runs per runtime; median reported (default 3)")
    p.add_argument("--images", type=int, default=500, help="images for the ListImages test (default 500)")
    p.add_argument("--list-calls", type=int, default=1000, help="ListImages calls timed (default 1000)")
    p.add_argument("--pull-threads", type=int, default=8, help="parallel CRI pulls of the small images")
    p.add_argument(
        "--config-kb",
        type=int,
        default=0,
        help="pad each small image's config with history to about this many KiB (default 0: tiny)",
    )
    p.add_argument("--pods-runs", type=int, default=10, help="pod start/teardown runs (default 10)")
    p.add_argument(
        "--memory-pods", type=int, default=20, help="running pods for the memory test (default 20)"
    )
    p.add_argument(
        "--list-containers", type=int, default=100, help="running containers for the List test (default 100)"
    )
    p.add_argument("--containers-per-pod", type=int, default=4, help="containers per pod there (default 4)")
    p.add_argument(
        "--pod-list-calls",
        type=int,
        default=500,
        help="ListContainers/ListPodSandbox calls timed (default 500)",
    )
    p.add_argument(
        "--pod-threads", type=int, default=4, help="parallel pod set-ups in tests 4c/4d (default 4)"
    )
    p.add_argument(
        "--crun",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time pod start/teardown with crun on both runtimes (default on)",
    )
    p.add_argument("--exec-runs", type=int, default=30, help="exec round trips timed (default 30)")
    p.add_argument(
        "--forward-mb", type=int, default=200, help="MB downloaded through port-forward (default 200)"
    )
    p.add_argument("--forward-runs", type=int, default=3, help="port-forward downloads (default 3)")
    p.add_argument(
        "--recovery-pods",
        type=int,
        default=100,
        help="running pods (1 container each) for the kill -9 recovery test (default 100)",
    )
    p.add_argument(
        "--recovery-runs",
        type=int,
        default=3,
        help="kill -9 / restart cycles on the same pods; median reported (default 3)",
    )
    concurrency.add_args(p)
    imagework.add_args(p)
    p.add_argument("--skip-images", action="store_true", help="skip test 8 (commit vs tar, rebuild)")
    p.add_argument("--skip-pods", action="store_true", help="skip test 4 (pods and containers)")
    p.add_argument("--skip-streaming", action="store_true", help="skip test 5 (exec, port-forward)")
    p.add_argument("--skip-recovery", action="store_true", help="skip test 6 (kill -9 recovery, idle RSS)")
    p.add_argument(
        "--skip-concurrency",
        action="store_true",
        help="skip test 7 (concurrency: stops, execs, reads, lifecycle)",
    )
    p.add_argument("--skip-containerd", action="store_true", help="measure pycri only")
    p.add_argument("--skip-pull", action="store_true", help="skip tests 1 and 2")
    p.add_argument("--skip-list", action="store_true", help="skip test 3")
    p.add_argument(
        "--only",
        type=_sections,
        metavar="SECTION[,SECTION...]",
        help=f"run only these sections, of {', '.join(SECTIONS)} (the --skip-* of the others are implied)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="parent of the temp dir holding registry storage and daemon roots (default /var/tmp)",
    )
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json", help="JSON results file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after the run")
    args = p.parse_args(argv)
    if args.layers < 2:
        p.error("--layers must be at least 2 (the second image shares all but one)")
    if args.runs < 1 or args.images < 1 or args.list_calls < 1 or args.pull_threads < 1:
        p.error("--runs, --images, --list-calls and --pull-threads must be positive")
    if (
        min(args.pods_runs, args.memory_pods, args.containers_per_pod, args.pod_list_calls, args.pod_threads)
        < 1
    ):
        p.error(
            "--pods-runs, --memory-pods, --containers-per-pod, --pod-list-calls and --pod-threads "
            "must be positive"
        )
    if min(args.exec_runs, args.forward_mb, args.forward_runs) < 1:
        p.error("--exec-runs, --forward-mb and --forward-runs must be positive")
    if args.list_containers < args.containers_per_pod:
        p.error("--list-containers must be at least --containers-per-pod")
    if min(args.recovery_pods, args.recovery_runs) < 1:
        p.error("--recovery-pods and --recovery-runs must be positive")
    concurrency.check_args(p, args)
    imagework.check_args(p, args)
    if args.only is not None:
        for section in SECTIONS:
            setattr(args, f"skip_{section}", section not in args.only)
    return args


# --- test 1 + 2: big pull, shared-layer pull, removal ------------------------------------------------


def _wait_empty(rt: Runtime, timeout: float = 10.0) -> dict[str, int]:
    """Store leftovers once they reach zero, or what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = rt.store_leftovers()
    while any(left.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        left = rt.store_leftovers()
    return left


def pull_run(make: RuntimeFactory, reg: Registry, big: BigImages, run: int) -> dict[str, Any]:
    rt = make(f"pull-{run}")
    try:
        rt.start()
        assert reg.log_path is not None
        window = RegistryLogWindow(reg.log_path)
        with rt.client() as client:
            window.mark()
            with RssSampler(rt.pid) as rss:
                started = time.perf_counter()
                client.pull(big.ref_a, timeout=600)
                seconds = time.perf_counter() - started
            fetched_a = blob_gets(window.read())

            window.mark()
            with RssSampler(rt.pid) as rss_b:
                started = time.perf_counter()
                client.pull(big.ref_b, timeout=600)
                seconds_b = time.perf_counter() - started
            fetched_b = blob_gets(window.read())

            images_before = len(client.list_images())
            client.remove_image(big.ref_a)
            client.remove_image(big.ref_b)
            images_after = len(client.list_images())
            leftovers = _wait_empty(rt)
    finally:
        rt.stop()

    def label(digest: str) -> str:
        info = big.blobs.get(digest)
        return info.label if info else digest[:19]

    layer_set = set(big.layers_a) | {big.new_layer}
    b_layers = [f.digest for f in fetched_b if f.digest in layer_set]
    return {
        "seconds": seconds,
        "peak_rss_mib": rss.peak_mib,
        "rss_samples": rss.samples,
        "bytes_a": sum(f.bytes for f in fetched_a),
        "blobs_a": [label(f.digest) for f in fetched_a],
        "second_seconds": seconds_b,
        "second_peak_rss_mib": rss_b.peak_mib,
        "bytes_b": sum(f.bytes for f in fetched_b),
        "blobs_b": [label(f.digest) for f in fetched_b],
        "second_only_new_layer": b_layers == [big.new_layer],
        "images_before_remove": images_before,
        "images_after_remove": images_after,
        "leftovers_after_remove": leftovers,
    }


# --- test 3: many images, ListImages latency -----------------------------------------------------------


def list_run(make: RuntimeFactory, refs: list[str], calls: int, threads: int) -> dict[str, Any]:
    rt = make("list")
    try:
        rt.start()
        with rt.client() as client:
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda ref: client.pull(ref, timeout=600), refs))
            pull_seconds = time.perf_counter() - started
            listed = client.list_images()
            if len(listed) < len(refs):
                raise RuntimeError(f"{rt.name}: ListImages shows {len(listed)} images, pulled {len(refs)}")
            response_bytes = sum(img.ByteSize() for img in listed)
            for _ in range(10):  # warm-up, not timed
                client.list_images()
            latencies: list[float] = []
            for _ in range(calls):
                t0 = time.perf_counter()
                client.list_images()
                latencies.append((time.perf_counter() - t0) * 1000)
            rss_kib = read_status_kib(rt.pid, "VmRSS") or 0
            hwm_kib = read_status_kib(rt.pid, "VmHWM") or 0
    finally:
        rt.stop()
    return {
        "images_listed": len(listed),
        "pull_seconds": pull_seconds,
        "response_bytes": response_bytes,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "mean_ms": sum(latencies) / len(latencies),
        "rss_mib": rss_kib / 1024,
        "hwm_mib": hwm_kib / 1024,
        "latencies_ms": latencies,
    }


# --- test 4: pods and containers --------------------------------------------------------------------------


def _routes_overlapping(subnet: str, own_devices: set[str]) -> list[str]:
    """Routes of other devices that overlap ``subnet``: someone else's network."""
    import ipaddress

    net = ipaddress.ip_network(subnet)
    out = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if not fields or fields[0] == "default":
            continue
        dev = fields[fields.index("dev") + 1] if "dev" in fields else ""
        try:
            other = ipaddress.ip_network(fields[0], strict=False)
        except ValueError:
            continue
        if other.overlaps(net) and dev not in own_devices:
            found.append(line)
    return found


def _iptables_rules() -> set[str]:
    try:
        out = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line for line in out.splitlines() if line and not line.startswith(("#", ":"))}


def _teardown_all(kube: pods.Kubelet, errors: list[str]) -> None:
    errors.extend(kube.teardown_all())


def make_pod_runtime(
    name: str, base: Path, registry_host: str, images: pods.PodImages, args: argparse.Namespace
) -> Runtime:
    network = POD_NETWORKS[name]
    if name == "pycri":
        return PycriRuntime(
            base / "pycri-pods", pod_network=network, default_runtime=HEADLINE_RUNTIME, log_level="info"
        )
    return ContainerdRuntime(
        base / "containerd-pods", registry_host, sandbox_image=images.pause, pod_network=network
    )


def pods_bench(
    args: argparse.Namespace,
    base: Path,
    reg: Registry,
    names: list[str],
    results: dict[str, dict[str, Any]],
    errors: list[str],
) -> None:
    """Test 4: results[name]["pods"]; every pod, daemon, bridge and cgroup gone on return."""
    for name in names:
        net = POD_NETWORKS[name]
        clash = _routes_overlapping(net.subnet, {net.bridge})
        if clash:
            raise RuntimeError(f"{name}'s pod subnet {net.subnet} is in use: {clash}")
    t0 = time.monotonic()
    images = pods.build_and_push_pod_images(reg)
    log(f"pushed busybox and {images.pause} in {time.monotonic() - t0:.1f}s")
    out: dict[str, dict[str, Any]] = {name: results[name].setdefault("pods", {}) for name in names}
    iptables_before = _iptables_rules()
    kubes: dict[str, pods.Kubelet] = {}
    runtimes: dict[str, Runtime] = {}

    def fail(name: str, what: str, exc: BaseException) -> None:
        msg = f"{name} pods {what}: {exc!r}"
        tail = runtimes[name].log_tail(15) if name in runtimes else ""
        errors.append(msg + (f"\n    daemon log tail:\n{tail}" if tail else ""))
        out[name].setdefault("errors", []).append(msg)
        log(f"{msg} FAILED")
        kube = kubes.get(name)
        if kube is not None:
            errors.extend(kube.teardown_all())

    with contextlib.ExitStack() as cleanup:
        # Runs last: the bench's pod cgroups, once every runtime and process is gone.
        cleanup.callback(lambda: cgroups.remove(pods.CGROUP_ROOT))
        for name in names:
            rt = make_pod_runtime(name, base, reg.host, images, args)
            runtimes[name] = rt

            def stop(rt: Runtime = rt) -> None:
                t = time.monotonic()
                rt.stop()
                left = getattr(rt, "cleanup_errors", [])
                if left:
                    errors.extend(f"{rt.name} cleanup: {e}" for e in left)
                log(f"{rt.name} (pods) stopped and cleaned up in {time.monotonic() - t:.1f}s")

            cleanup.callback(stop)
            try:
                rt.start()
                client = rt.client()
                cleanup.callback(client.close)
                kube = pods.prepare(rt, client, images, base / f"{name}-kubelet", POD_NETWORKS[name].subnet)
                cleanup.callback(_teardown_all, kube, errors)
                kubes[name] = kube
                log(f"{name} ready for pods (warm-up pod got {kube.pod_ip})")
            except Exception as exc:
                fail(name, "start", exc)
        live = [n for n in names if n in kubes]

        # a + b: interleaved rounds, order alternating, so drift hits both alike.
        for run in range(0 if args.skip_pods else args.pods_runs):
            for name in live if run % 2 == 0 else live[::-1]:
                if out[name].get("errors"):
                    continue
                handlers = [""]  # the default handler: runc on both
                if args.crun:
                    handlers.append(SIDE_RUNTIME)
                for handler in handlers:
                    suffix = f"_{handler}" if handler else ""
                    try:
                        start, stop_times = pods.latency_round(kubes[name], handler)
                    except Exception as exc:
                        fail(name, f"latency run {run}{' ' + handler if handler else ''}", exc)
                        break
                    out[name].setdefault("start" + suffix, []).append(start)
                    out[name].setdefault("teardown" + suffix, []).append(stop_times)
                    log(
                        f"{name}{' (' + handler + ')' if handler else ''} pod run {run}: start "
                        f"{start['total'] * 1000:.0f} ms (run {start['run_pod'] * 1000:.0f} / create "
                        f"{start['create'] * 1000:.0f} / start {start['start'] * 1000:.0f}); teardown "
                        f"{stop_times['total'] * 1000:.0f} ms "
                        f"(container {stop_times['container_total'] * 1000:.0f})"
                    )

        # c: memory
        for name in [] if args.skip_pods else live:
            try:
                mem = pods.memory_phase(kubes[name], args.memory_pods, args.pod_threads)
            except Exception as exc:
                fail(name, "memory", exc)
                continue
            out[name]["memory"] = mem
            log(
                f"{name}: {args.memory_pods} pods running: RSS {mem['rss_mib']:.1f} MiB "
                f"(daemon {mem['daemon_rss_mib']:.1f}), PSS {mem['pss_mib']:.1f} MiB; "
                + ", ".join(f"{role} x{int(v['count'])}" for role, v in mem["roles"].items())
            )

        # d: List* with many containers
        per_pod = args.containers_per_pod
        list_pods = args.list_containers // per_pod
        for name in [] if args.skip_pods else live:
            try:
                res = pods.list_phase(kubes[name], list_pods, per_pod, args.pod_list_calls, args.pod_threads)
            except Exception as exc:
                fail(name, "list", exc)
                continue
            out[name]["list"] = res
            lc, lp = res["list_containers"], res["list_pods"]
            log(
                f"{name}: {res['containers']} containers in {list_pods} pods set up in "
                f"{res['setup_seconds']:.1f}s; "
                f"ListContainers p50 {lc['p50_ms']:.2f} p99 {lc['p99_ms']:.2f} ms; "
                f"ListPodSandbox p50 {lp['p50_ms']:.2f} p99 {lp['p99_ms']:.2f} ms"
            )

        # 5: streaming (exec, port-forward), same client for both
        for name in [] if args.skip_streaming else live:
            try:
                res = streaming.streaming_phase(
                    kubes[name], args.exec_runs, args.forward_mb, args.forward_runs
                )
            except Exception as exc:
                fail(name, "streaming", exc)
                continue
            results[name]["streaming"] = res
            log(
                f"{name}: exec echo hi median {res['exec_median_ms']:.1f} ms "
                f"(min {res['exec_min_ms']:.1f}, max {res['exec_max_ms']:.1f}); port-forward "
                f"{args.forward_mb} MB at {res['forward_mb_per_s']:.0f} MB/s "
                f"(best {res['forward_best_mb_per_s']:.0f})"
            )
    # Only what can be ours: another runtime on this host may change its own rules meanwhile.
    marks = ("CNI-", "198.19.0.", "198.19.1.", *(n.bridge for n in POD_NETWORKS.values()))
    added = sorted(r for r in _iptables_rules() - iptables_before if any(m in r for m in marks))
    if added:
        errors.append(f"iptables rules left behind: {added}")
    for name in names:
        out[name]["iptables_rules_added"] = added
        if name in kubes:
            out[name]["pod_ip"] = kubes[name].pod_ip


# --- report ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    pycri: float | str | None
    containerd: float | str | None
    target: str = "—"
    met: bool | None = None
    digits: int = 2
    ratio: bool = True


def _fmt(value: float | str | None, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def render_table(rows: list[Row]) -> str:
    lines = [
        "| metric | pycri | containerd | ratio (pycri/containerd) | target | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = "—"
        if (
            r.ratio
            and isinstance(r.pycri, float | int)
            and isinstance(r.containerd, float | int)
            and r.containerd
        ):
            ratio = f"{r.pycri / r.containerd:.2f}"
        met = "—" if r.met is None else ("yes" if r.met else "**NO**")
        lines.append(
            f"| {r.metric} | {_fmt(r.pycri, r.digits)} | {_fmt(r.containerd, r.digits)} | {ratio} "
            f"| {r.target} | {met} |"
        )
    return "\n".join(lines)


def build_rows(
    args: argparse.Namespace, results: dict[str, dict[str, Any]], big: BigImages | None
) -> list[Row]:
    rows: list[Row] = []
    py, cd = results.get("pycri", {}), results.get("containerd", {})

    def get(res: dict[str, Any], key: str, fn: Callable[[list[dict[str, Any]]], Any]) -> Any:
        runs = res.get(key)
        return fn(runs) if runs else None

    if not args.skip_pull and big is not None:
        mb = args.pull_mb
        median_s: Callable[[list[dict[str, Any]]], float] = lambda runs: median([r["seconds"] for r in runs])  # noqa: E731
        py_s, cd_s = get(py, "pull", median_s), get(cd, "pull", median_s)
        rows.append(
            Row(f"pull {mb} MiB / {args.layers} layers: wall time, median of {args.runs} (s)", py_s, cd_s)
        )
        rows.append(
            Row(
                "pull: throughput (MiB/s)",
                mb / py_s if py_s else None,
                mb / cd_s if cd_s else None,
                digits=0,
            )
        )
        peak: Callable[[list[dict[str, Any]]], float] = lambda runs: max(r["peak_rss_mib"] for r in runs)  # noqa: E731
        py_rss = get(py, "pull", peak)
        rows.append(
            Row(
                "pull: peak daemon RSS, max of runs (MiB)",
                py_rss,
                get(cd, "pull", peak),
                target=f"< {RSS_TARGET_MB:.0f}",
                met=None if py_rss is None else py_rss < RSS_TARGET_MB,
                digits=0,
            )
        )
        fetched: Callable[[list[dict[str, Any]]], float] = lambda runs: runs[-1]["bytes_a"] / MB  # noqa: E731
        rows.append(
            Row(
                "pull: bytes served by the registry (MiB)",
                get(py, "pull", fetched),
                get(cd, "pull", fetched),
                target=f"{big.total_a / MB:.1f}",
                digits=1,
            )
        )

        def empty(runs: list[dict[str, Any]]) -> str:
            ok = all(
                not any(r["leftovers_after_remove"].values()) and r["images_after_remove"] == 0 for r in runs
            )
            return "yes" if ok else "no: " + json.dumps(runs[-1]["leftovers_after_remove"])

        py_empty = get(py, "pull", empty)
        rows.append(
            Row(
                "store empty after RemoveImage (all runs)",
                py_empty,
                get(cd, "pull", empty),
                target="yes",
                met=None if py_empty is None else py_empty == "yes",
            )
        )

        def second_blobs(runs: list[dict[str, Any]]) -> str:
            return ", ".join(runs[-1]["blobs_b"]) or "none"

        def only_new(runs: list[dict[str, Any]]) -> bool:
            return all(r["second_only_new_layer"] for r in runs)

        new_label = big.blobs[big.new_layer].label
        py_only = get(py, "pull", only_new)
        rows.append(
            Row(
                "2nd image (shares 4/5 layers): blobs fetched",
                get(py, "pull", second_blobs),
                get(cd, "pull", second_blobs),
                target=f"only {new_label} (+ config b)",
                met=py_only,
            )
        )
        second_mb: Callable[[list[dict[str, Any]]], float] = lambda runs: runs[-1]["bytes_b"] / MB  # noqa: E731
        rows.append(
            Row(
                "2nd image: bytes served by the registry (MiB)",
                get(py, "pull", second_mb),
                get(cd, "pull", second_mb),
                target=f"≈ {big.blobs[big.new_layer].size / MB:.1f}",
                digits=1,
            )
        )
        second_s: Callable[[list[dict[str, Any]]], float] = lambda runs: median(  # noqa: E731
            [r["second_seconds"] for r in runs]
        )
        rows.append(
            Row("2nd image: wall time, median (s)", get(py, "pull", second_s), get(cd, "pull", second_s))
        )

    if not args.skip_list:
        n = args.images
        py_l, cd_l = py.get("list"), cd.get("list")

        def val(res: dict[str, Any] | None, key: str) -> float | None:
            return None if not res else float(res[key])

        rows.append(
            Row(
                f"{n} images: pull wall time, {args.pull_threads} threads (s)",
                val(py_l, "pull_seconds"),
                val(cd_l, "pull_seconds"),
            )
        )
        cfg = f", ~{args.config_kb} KiB configs" if args.config_kb else ""
        rows.append(Row(f"ListImages ({n} images{cfg}): p50 (ms)", val(py_l, "p50_ms"), val(cd_l, "p50_ms")))
        py_p99 = val(py_l, "p99_ms")
        rows.append(
            Row(
                f"ListImages ({n} images{cfg}): p99 of {args.list_calls} calls (ms)",
                py_p99,
                val(cd_l, "p99_ms"),
                target=f"< {LIST_P99_TARGET_MS:.0f}",
                met=None if py_p99 is None else py_p99 < LIST_P99_TARGET_MS,
            )
        )
        rows.append(
            Row(
                f"daemon RSS holding {n} images (MiB)",
                val(py_l, "rss_mib"),
                val(cd_l, "rss_mib"),
                digits=0,
            )
        )
    if not args.skip_pods:
        rows += build_pod_rows(args, results)
    if not args.skip_streaming:
        rows += build_streaming_rows(args, results)
    if not args.skip_recovery:
        rows += [Row(**row) for row in recovery.table_rows(args, results)]
    if not args.skip_concurrency:
        rows += [Row(**row) for row in concurrency.table_rows(args, results)]
    return rows


def _ratio_met(py: float | None, cd: float | None, limit: float) -> bool | None:
    if py is None or cd is None or not cd:
        return None
    return py / cd <= limit


def build_pod_rows(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    py, cd = results.get("pycri", {}).get("pods", {}), results.get("containerd", {}).get("pods", {})
    n = args.pods_runs
    other = SIDE_RUNTIME

    def med(res: dict[str, Any], key: str, field: str) -> float | None:
        runs = res.get(key)
        return median([r[field] for r in runs]) * 1000 if runs else None

    start_py, start_cd = med(py, "start", "total"), med(cd, "start", "total")
    rows.append(
        Row(
            f"pod start: RunPodSandbox+CreateContainer+StartContainer, median of {n} (ms)",
            start_py,
            start_cd,
            target=f"≤ {POD_LATENCY_RATIO}x containerd",
            met=_ratio_met(start_py, start_cd, POD_LATENCY_RATIO),
            digits=0,
        )
    )
    for field, label in (
        ("run_pod", "RunPodSandbox"),
        ("create", "CreateContainer"),
        ("start", "StartContainer"),
    ):
        rows.append(
            Row(f"  … {label}, median (ms)", med(py, "start", field), med(cd, "start", field), digits=1)
        )
    if py.get(f"start_{other}") or cd.get(f"start_{other}"):
        crun_py, crun_cd = med(py, f"start_{other}", "total"), med(cd, f"start_{other}", "total")
        rows.append(
            Row(
                f"pod start with {other} on both, median of {n} (ms)",
                crun_py,
                crun_cd,
                target=f"≤ {POD_LATENCY_RATIO}x containerd",
                met=_ratio_met(crun_py, crun_cd, POD_LATENCY_RATIO),
                digits=0,
            )
        )
    stop_py, stop_cd = med(py, "teardown", "total"), med(cd, "teardown", "total")
    rows.append(
        Row(
            "pod teardown: StopContainer(10)+RemoveContainer+StopPodSandbox+RemovePodSandbox, "
            f"median of {n} (ms)",
            stop_py,
            stop_cd,
            target=f"≤ {POD_LATENCY_RATIO}x containerd",
            met=_ratio_met(stop_py, stop_cd, POD_LATENCY_RATIO),
            digits=0,
        )
    )
    rows.append(
        Row(
            "container stop+remove alone (StopContainer+RemoveContainer), median (ms)",
            med(py, "teardown", "container_total"),
            med(cd, "teardown", "container_total"),
            digits=0,
        )
    )
    for field, label in (
        ("stop_container", "StopContainer"),
        ("remove_container", "RemoveContainer"),
        ("stop_pod", "StopPodSandbox"),
        ("remove_pod", "RemovePodSandbox"),
    ):
        rows.append(
            Row(f"  … {label}, median (ms)", med(py, "teardown", field), med(cd, "teardown", field), digits=1)
        )
    if py.get(f"teardown_{other}") or cd.get(f"teardown_{other}"):
        crun_py, crun_cd = med(py, f"teardown_{other}", "total"), med(cd, f"teardown_{other}", "total")
        rows.append(
            Row(
                f"pod teardown with {other} on both, median of {n} (ms)",
                crun_py,
                crun_cd,
                target=f"≤ {POD_LATENCY_RATIO}x containerd",
                met=_ratio_met(crun_py, crun_cd, POD_LATENCY_RATIO),
                digits=0,
            )
        )

    def mem(res: dict[str, Any], key: str) -> float | None:
        m = res.get("memory")
        return float(m[key]) if m else None

    def roles(res: dict[str, Any]) -> str | None:
        m = res.get("memory")
        if not m:
            return None
        return ", ".join(
            f"{role} {int(v['count'])} x {v['rss_kib'] / max(v['count'], 1) / 1024:.1f}"
            for role, v in m["roles"].items()
        )

    mp = args.memory_pods
    rss_py, rss_cd = mem(py, "rss_mib"), mem(cd, "rss_mib")
    rows.append(
        Row(
            f"memory, {mp} pods x 1 container: daemon + per-pod processes, VmRSS sum (MiB)",
            rss_py,
            rss_cd,
            target=f"≤ {POD_MEMORY_RATIO}x containerd",
            met=_ratio_met(rss_py, rss_cd, POD_MEMORY_RATIO),
            digits=1,
        )
    )
    rows.append(Row("  … daemon VmRSS (MiB)", mem(py, "daemon_rss_mib"), mem(cd, "daemon_rss_mib"), digits=1))
    rows.append(
        Row(
            "  … per-pod processes VmRSS sum (MiB)",
            mem(py, "per_pod_rss_mib"),
            mem(cd, "per_pod_rss_mib"),
            digits=1,
        )
    )
    rows.append(Row("  … processes counted: role, count x MiB RSS each", roles(py), roles(cd), ratio=False))
    rows.append(Row("  … same, PSS sum (MiB)", mem(py, "pss_mib"), mem(cd, "pss_mib"), digits=1))

    def lst(res: dict[str, Any], call: str, key: str) -> float | None:
        m = res.get("list")
        return float(m[call][key]) if m else None

    total = (args.list_containers // args.containers_per_pod) * args.containers_per_pod
    pods_n = args.list_containers // args.containers_per_pod
    calls = args.pod_list_calls
    for call, label in (
        ("list_containers", f"ListContainers ({total} running)"),
        ("list_pods", f"ListPodSandbox ({pods_n} pods)"),
    ):
        rows.append(Row(f"{label}: p50 (ms)", lst(py, call, "p50_ms"), lst(cd, call, "p50_ms")))
        p99 = lst(py, call, "p99_ms")
        rows.append(
            Row(
                f"{label}: p99 of {calls} calls (ms)",
                p99,
                lst(cd, call, "p99_ms"),
                target=f"< {POD_LIST_P99_TARGET_MS:.0f}",
                met=None if p99 is None else p99 < POD_LIST_P99_TARGET_MS,
            )
        )

    def list_extra(res: dict[str, Any], key: str) -> float | None:
        m = res.get("list")
        if not m:
            return None
        return float(m["memory"]["rss_mib"]) if key == "rss" else float(m.get(key, math.nan))

    rows.append(
        Row(
            f"{total} containers: set-up wall time, {args.pod_threads} threads (s)",
            list_extra(py, "setup_seconds"),
            list_extra(cd, "setup_seconds"),
            digits=1,
        )
    )
    rows.append(
        Row(
            f"{total} containers: daemon + per-pod processes VmRSS (MiB)",
            list_extra(py, "rss"),
            list_extra(cd, "rss"),
            digits=1,
        )
    )
    rows.append(
        Row(
            f"{total} containers: idle CPU of daemon + per-pod processes, 5 s (% of a core)",
            list_extra(py, "idle_cpu_percent"),
            list_extra(cd, "idle_cpu_percent"),
            digits=1,
        )
    )
    return rows


def build_streaming_rows(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[Row]:
    py, cd = results.get("pycri", {}).get("streaming"), results.get("containerd", {}).get("streaming")

    def val(res: dict[str, Any] | None, key: str) -> float | None:
        return None if not res else float(res[key])

    exec_py, exec_cd = val(py, "exec_median_ms"), val(cd, "exec_median_ms")
    fwd_py = val(py, "forward_mb_per_s")
    return [
        Row(
            f"exec `echo hi` over SPDY, Exec RPC to exit status, median of {args.exec_runs} (ms)",
            exec_py,
            exec_cd,
            target="≤ containerd",
            met=_ratio_met(exec_py, exec_cd, EXEC_RATIO),
            digits=1,
        ),
        Row("  … exec, min (ms)", val(py, "exec_min_ms"), val(cd, "exec_min_ms"), digits=1),
        Row(
            f"port-forward over SPDY, 1 connection, {args.forward_mb} MB from httpd in the pod, "
            f"median of {args.forward_runs} (MB/s)",
            fwd_py,
            val(cd, "forward_mb_per_s"),
            target=f"≥ {FORWARD_TARGET_MB_S:.0f}",
            met=None if fwd_py is None else fwd_py >= FORWARD_TARGET_MB_S,
            digits=0,
        ),
        Row(
            "  … port-forward, best run (MB/s)",
            val(py, "forward_best_mb_per_s"),
            val(cd, "forward_best_mb_per_s"),
            digits=0,
        ),
        Row(
            "  … port-forward: CPU of daemon + per-pod processes meanwhile (% of a core)",
            val(py, "forward_cpu_percent"),
            val(cd, "forward_cpu_percent"),
            digits=0,
        ),
    ]


# --- main --------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "kernel": platform.release(), "cpus": str(os.cpu_count())}
    for pkg in ("containerd", "docker-registry"):
        res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        out[pkg] = res.stdout.strip() or "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench needs root (containerd, overlay mounts)", file=sys.stderr)
        return 2
    wall_start = time.monotonic()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="pycri-bench-", dir=args.workdir))
    results: dict[str, dict[str, Any]] = {"pycri": {}, "containerd": {}}
    errors: list[str] = []
    big: BigImages | None = None
    names = ["pycri"] if args.skip_containerd else ["pycri", "containerd"]
    exit_code = 0
    with contextlib.ExitStack() as cleanup:
        if not args.keep:
            cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        try:
            log(f"workdir {base}")
            reg = start_registry(base / "registry")
            cleanup.callback(reg.stop)
            log(f"registry on {reg.host}")

            def factory(name: str) -> RuntimeFactory:
                def make(tag: str) -> Runtime:
                    workdir = base / f"{name}-{tag}"
                    if name == "pycri":
                        return PycriRuntime(workdir)
                    return ContainerdRuntime(workdir, reg.host)

                return make

            if not args.skip_pull:
                t0 = time.monotonic()
                big = build_and_push_big(reg, args.pull_mb * MB, args.layers)
                log(
                    f"built and pushed big images ({args.pull_mb} MiB, {args.layers} layers) "
                    f"in {time.monotonic() - t0:.1f}s"
                )
            refs: list[str] = []
            if not args.skip_list:
                t0 = time.monotonic()
                refs = build_and_push_many(reg, args.images, config_kb=args.config_kb)
                log(f"pushed {len(refs)} small images in {time.monotonic() - t0:.1f}s")

            if big is not None:
                # Interleaved, so drift (page cache, thermal, neighbours) hits both alike.
                for run in range(args.runs):
                    for name in names:
                        if name in results and results[name].get("error"):
                            continue
                        try:
                            res = pull_run(factory(name), reg, big, run)
                        except Exception as exc:
                            errors.append(f"{name} pull run {run}: {exc!r}")
                            results[name]["error"] = repr(exc)
                            log(f"{name} pull run {run} FAILED: {exc!r}")
                            continue
                        results[name].setdefault("pull", []).append(res)
                        log(
                            f"{name} pull run {run}: {res['seconds']:.2f}s, "
                            f"peak RSS {res['peak_rss_mib']:.0f} MiB; "
                            f"2nd image {res['second_seconds']:.2f}s fetched {res['blobs_b']}; "
                            f"after remove {res['leftovers_after_remove']}"
                        )
            if refs:
                for name in names:
                    try:
                        res = list_run(factory(name), refs, args.list_calls, args.pull_threads)
                    except Exception as exc:
                        errors.append(f"{name} list: {exc!r}")
                        log(f"{name} list FAILED: {exc!r}")
                        continue
                    results[name]["list"] = res
                    log(
                        f"{name}: pulled {len(refs)} images in {res['pull_seconds']:.1f}s; ListImages "
                        f"p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms"
                    )
            if not (args.skip_pods and args.skip_streaming):
                pods_bench(args, base, reg, names, results, errors)
            if not args.skip_recovery:
                recovery.recovery_bench(
                    args,
                    base / "recovery",
                    reg,
                    names,
                    results,
                    errors,
                    make_runtime=lambda name, work, images: make_pod_runtime(
                        name, work, reg.host, images, args
                    ),
                    networks=POD_NETWORKS,
                    iptables_rules=_iptables_rules,
                    routes_overlapping=_routes_overlapping,
                )
            if not args.skip_concurrency:
                concurrency.concurrency_bench(
                    args,
                    base / "concurrency",
                    reg,
                    names,
                    results,
                    errors,
                    make_runtime=lambda name, work, images: make_pod_runtime(
                        name, work, reg.host, images, args
                    ),
                    networks=POD_NETWORKS,
                    iptables_rules=_iptables_rules,
                    routes_overlapping=_routes_overlapping,
                )
            if not args.skip_images:
                net = POD_NETWORKS["pycri"]
                clash = _routes_overlapping(net.subnet, {net.bridge})
                if clash:
                    raise RuntimeError(f"pycri's pod subnet {net.subnet} is in use: {clash}")
                imagework.images_bench(args, base, reg, net, results, errors)
        except KeyboardInterrupt:
            errors.append("interrupted")
            exit_code = 130
        except Exception as exc:
            errors.append(f"bench failed: {exc!r}")
            log(f"FAILED: {exc!r}")
            exit_code = 1

    total = time.monotonic() - wall_start
    rows = build_rows(args, results, big)
    table = render_table(rows)
    print()
    print(table)
    print()
    images_table = imagework.render(args, results)
    if images_table:
        print(images_table)
        print()
    print(f"total bench time: {total:.0f} s")
    if errors:
        print("errors:\n  " + "\n  ".join(errors))
        exit_code = exit_code or 1

    report = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": _versions(),
        "total_seconds": total,
        "table": [
            {
                "metric": r.metric,
                "pycri": r.pycri,
                "containerd": r.containerd,
                "target": r.target,
                "met": r.met,
            }
            for r in rows
        ],
        "results": results,
        "errors": errors,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results written to {args.output}")
    if args.keep:
        print(f"temp dir kept: {base}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
