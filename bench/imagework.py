"""Image work on pycri's own store (issue 15): ``pycri commit`` against ``tar -czf`` + ``sha256sum``
of the same upper directory, and an unchanged rebuild of a 5-step Containerfile.

* **commit**: a real container (busybox from the loopback registry, runc) writes ``--commit-mb``
  MiB of random content (so compression is honest): half in one big file, half in 16 KiB
  files spread over 32 directories. Then, on the same machine and the same page cache, the
  reference: ``tar -czf`` of its upper directory (GNU tar through gzip -6, as ``tar -czf``
  always does) followed by ``sha256sum`` of the archive; and ``pycri commit`` of the
  container, timed from the CLI (process start-up included) and as the daemon logs it.
  The order of the two alternates from run to run, so neither always gets the warmer cache.
  Median of ``--commit-runs``; each run uses a fresh container and removes its image after.
* **rebuild**: ``pycri build`` of a 5-step Containerfile (FROM, RUN, COPY, ENV, COPY), then
  ``--rebuild-runs`` unchanged rebuilds, each timed from the CLI; each must answer every step
  from the cache (no RUN) with the same image ID.

Only pycri is measured (containerd has neither); the reference column is GNU tar.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure import median, read_cpu_ticks
from bench.pods import build_and_push_pod_images
from bench.runtimes import PodNetwork, PycriRuntime
from tests.support.registry import Registry

MIB = 1024 * 1024
SMALL_FILE = 16 * 1024
SMALL_DIRS = 32
COMMIT_RATIO_TARGET = 1.0  # commit <= tar -czf + sha256sum
REBUILD_TARGET_S = 1.0
CONTAINERFILE = """\
FROM {image}
RUN echo built > /built && mkdir -p /app
COPY a.txt /app/a.txt
ENV MODE=bench
COPY b.txt /app/b.txt
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--commit-mb", type=int, default=100, help="MiB of changes in the committed container (default 100)"
    )
    p.add_argument("--commit-runs", type=int, default=5, help="commit runs; median reported (default 5)")
    p.add_argument("--rebuild-runs", type=int, default=5, help="unchanged rebuilds timed (default 5)")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.commit_mb < 2 or min(args.commit_runs, args.rebuild_runs) < 1:
        p.error("--commit-mb must be at least 2; --commit-runs and --rebuild-runs must be positive")


def _writer_script(total_mb: int) -> str:
    """Shell run in the container: half the bytes in one file, half in 16 KiB files."""
    big = total_mb * MIB // 2
    count = (total_mb * MIB - big) // SMALL_FILE
    per_dir = max(1, count // SMALL_DIRS)
    return (
        "set -e; mkdir -p /data; "
        f"head -c {big} /dev/urandom > /data/big.bin; "
        f"n=0; for d in $(seq 1 {SMALL_DIRS}); do mkdir /data/d$d; "
        f"for f in $(seq 1 {per_dir}); do head -c {SMALL_FILE} /dev/urandom > /data/d$d/f$f; done; done; "
        "sync; touch /ready; sleep 3600"
    )


def _pycri(daemon_socket: Path, root: Path, *args: str, timeout: float = 600) -> tuple[float, str]:
    """Run ``pycri ARGS`` against the bench daemon; (seconds, stdout). Raises on failure."""
    started = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cri_runtime.daemon.cli",
            *args,
            "--socket",
            str(daemon_socket),
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.perf_counter() - started
    if res.returncode != 0:
        raise RuntimeError(f"pycri {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return seconds, res.stdout


def _wait_ready(rt: PycriRuntime, cid: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with rt.client() as client:
        while time.monotonic() < deadline:
            if client.exec_sync(cid, ["test", "-e", "/ready"], timeout=10).exit_code == 0:
                return
            time.sleep(0.2)
    raise RuntimeError(f"container {cid} did not write its changes within {timeout:.0f}s")


def _daemon_commit_log(rt: PycriRuntime, cid: str) -> dict[str, Any]:
    """The daemon's "container committed" line for ``cid``: seconds, pack_seconds, ..."""
    found: dict[str, Any] = {}
    for line in rt.daemon.log_path.read_text(errors="replace").splitlines():
        if "container committed" in line and cid in line:
            found = json.loads(line)
    return found


def _du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.split()[0])


def commit_run(rt: PycriRuntime, pod: str, image: str, work: Path, run: int, mb: int) -> dict[str, Any]:
    socket, root = rt.daemon.socket, rt.daemon.root
    with rt.client() as client:
        cid = client.create_container(
            pod, f"writer{run}", image, command=["sh", "-c", _writer_script(mb)], log_path=f"writer{run}.log"
        )
        client.start_container(cid)
    try:
        t0 = time.perf_counter()
        _wait_ready(rt, cid)
        write_seconds = time.perf_counter() - t0
        upper = root / "containers" / cid / "upper"
        upper_bytes = _du_bytes(upper)
        archive = work / f"ref-{run}.tar.gz"

        cpu: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")

        def children_cpu() -> float:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            return usage.ru_utime + usage.ru_stime

        def reference() -> float:
            os.sync()  # both start with no writes of earlier steps pending
            before = children_cpu()
            started = time.perf_counter()
            subprocess.run(["tar", "-czf", str(archive), "-C", str(upper), "."], check=True, timeout=600)
            subprocess.run(["sha256sum", str(archive)], check=True, capture_output=True, timeout=120)
            seconds = time.perf_counter() - started
            cpu["tar"] = children_cpu() - before
            # pycri's store makes a new layer durable (syncfs) before the database names it; tar
            # leaves its archive in the page cache. Also timed: the flush that would make it durable.
            started = time.perf_counter()
            os.sync()
            cpu["tar_sync"] = time.perf_counter() - started
            return seconds

        def commit() -> tuple[float, str]:
            # CPU of the daemon (all its threads) and of the CLI process.
            os.sync()
            before, cli_before = read_cpu_ticks(rt.pid) or 0, children_cpu()
            seconds, out = _pycri(socket, root, "commit", cid, f"bench/commit:{run}")
            cpu["commit"] = ((read_cpu_ticks(rt.pid) or 0) - before) / tick + children_cpu() - cli_before
            return seconds, out.split()[0]

        # Alternate who goes first: both read the same files; neither always gets the warmer cache.
        if run % 2 == 0:
            tar_seconds = reference()
            commit_seconds, image_id = commit()
        else:
            commit_seconds, image_id = commit()
            tar_seconds = reference()
        archive_bytes = archive.stat().st_size
        archive.unlink()
        logged = _daemon_commit_log(rt, cid)
        with rt.client() as client:
            status = client.image_status(image_id).image
            if not status.id:
                raise RuntimeError(f"committed image {image_id} is not in the store")
            # The image runs: its big file reads back whole.
            check = client.create_container(
                pod,
                f"check{run}",
                f"bench/commit:{run}",
                command=[
                    "sh",
                    "-c",
                    f"test $(wc -c < /data/big.bin) -eq {mb * MIB // 2} && ls /data/d1 | wc -l",
                ],
                log_path=f"check{run}.log",
            )
            client.start_container(check)
            for _ in range(300):
                st = client.container_status(check).status
                if st.state == 2:  # CONTAINER_EXITED
                    break
                time.sleep(0.1)
            if st.exit_code != 0:
                raise RuntimeError(
                    f"a container of the committed image failed its check (exit {st.exit_code})"
                )
            client.remove_container(check)
    finally:
        with rt.client() as client:
            client.stop_container(cid, timeout=0)
            client.remove_container(cid)
    with rt.client() as client:
        client.remove_image(f"bench/commit:{run}")
    return {
        "tar_seconds": tar_seconds,
        "commit_seconds": commit_seconds,
        "commit_in_daemon_seconds": logged.get("seconds"),
        "commit_pack_seconds": logged.get("pack_seconds"),
        "ratio": commit_seconds / tar_seconds,
        "tar_sync_seconds": tar_seconds + cpu["tar_sync"],
        "ratio_durable": commit_seconds / (tar_seconds + cpu["tar_sync"]),
        "tar_cpu_seconds": cpu["tar"],
        "commit_cpu_seconds": cpu["commit"],
        "load_average": os.getloadavg()[0],
        "upper_bytes": upper_bytes,
        "archive_bytes": archive_bytes,
        "layer_bytes": int(status.size),
        "write_seconds": write_seconds,
    }


def rebuild_runs(rt: PycriRuntime, image: str, work: Path, runs: int) -> dict[str, Any]:
    context = work / "context"
    context.mkdir(parents=True, exist_ok=True)
    (context / "a.txt").write_text("first file\n")
    (context / "b.txt").write_text("second file\n")
    (context / "Containerfile").write_text(CONTAINERFILE.format(image=image))
    socket, root = rt.daemon.socket, rt.daemon.root
    first_seconds, out = _pycri(socket, root, "build", "-t", "bench/built:1", str(context))
    image_id = out.split()[0]
    times: list[float] = []
    for _ in range(runs):
        seconds, out = _pycri(socket, root, "build", "-t", "bench/built:1", str(context))
        if out.split()[0] != image_id:
            raise RuntimeError(f"unchanged rebuild gave {out.split()[0]}, first build {image_id}")
        times.append(seconds)
    with rt.client() as client:
        client.remove_image("bench/built:1")
    return {"first_build_seconds": first_seconds, "rebuild_seconds": times, "rebuild_median": median(times)}


def images_bench(
    args: argparse.Namespace,
    base: Path,
    reg: Registry,
    network: PodNetwork,
    results: dict[str, dict[str, Any]],
    errors: list[str],
) -> None:
    """results["pycri"]["images"]: commit runs and rebuild times; daemon and pods gone on return."""
    out: dict[str, Any] = results["pycri"].setdefault("images", {})
    images = build_and_push_pod_images(reg)
    rt = PycriRuntime(base / "pycri-images", pod_network=network, default_runtime="runc", log_level="info")
    rt.start()
    try:
        with rt.client() as client:
            client.pull(images.busybox, timeout=300)
            pod = client.run_pod("imagework", log_directory=str(base / "imagework-logs"))
        work = base / "imagework"
        work.mkdir(parents=True, exist_ok=True)
        runs: list[dict[str, Any]] = []
        for run in range(args.commit_runs):
            try:
                res = commit_run(rt, pod, images.busybox, work, run, args.commit_mb)
            except Exception as exc:
                errors.append(f"pycri commit run {run}: {exc!r}")
                log(f"commit run {run} FAILED: {exc!r}\n{rt.log_tail(15)}")
                continue
            runs.append(res)
            log(
                f"commit run {run}: tar -czf + sha256sum {res['tar_seconds']:.2f}s, pycri commit "
                f"{res['commit_seconds']:.2f}s (daemon {res['commit_in_daemon_seconds']}s, "
                f"of which packing {res['commit_pack_seconds']}s), "
                f"ratio {res['ratio']:.2f} (with sync {res['ratio_durable']:.2f}); "
                f"CPU tar {res['tar_cpu_seconds']:.2f}s, commit "
                f"{res['commit_cpu_seconds']:.2f}s; upper {res['upper_bytes'] / MIB:.1f} MiB; "
                f"load {res['load_average']:.1f}"
            )
        out["commit"] = runs
        try:
            out["rebuild"] = rebuild_runs(rt, images.busybox, work, args.rebuild_runs)
            log(
                f"first build {out['rebuild']['first_build_seconds']:.2f}s; unchanged rebuilds "
                + ", ".join(f"{s:.2f}" for s in out["rebuild"]["rebuild_seconds"])
            )
        except Exception as exc:
            errors.append(f"pycri rebuild: {exc!r}")
            log(f"rebuild FAILED: {exc!r}")
    finally:
        rt.stop()


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    res = results.get("pycri", {}).get("images")
    if not res:
        return ""
    lines = [
        "| image work (pycri) | pycri | reference | ratio pycri/reference | target | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    runs = res.get("commit") or []
    if runs:
        commit_s = median([r["commit_seconds"] for r in runs])
        tar_s = median([r["tar_seconds"] for r in runs])
        ratio = median([r["ratio"] for r in runs])
        daemon_s = [r["commit_in_daemon_seconds"] for r in runs if r["commit_in_daemon_seconds"] is not None]
        met = "yes" if ratio <= COMMIT_RATIO_TARGET else "**NO**"
        lines.append(
            f"| commit of {args.commit_mb} MiB of changes (1 file + {SMALL_FILE // 1024} KiB files), "
            f"CLI wall time vs `tar -czf` + `sha256sum`, median of {len(runs)} (s) | {commit_s:.2f} "
            f"| {tar_s:.2f} | {ratio:.2f} (median of per-run ratios) | ≤ 1.00 | {met} |"
        )
        durable = [r["ratio_durable"] for r in runs if "ratio_durable" in r]
        if durable:
            lines.append(
                f"| … the same against `tar -czf` + `sha256sum` + `sync` (the archive made durable, as "
                f"pycri's store makes its layer), median (s) | {commit_s:.2f} "
                f"| {median([r['tar_sync_seconds'] for r in runs]):.2f} | {median(durable):.2f} | — | — |"
            )
        if daemon_s:
            lines.append(
                f"| … commit, in the daemon (its log), median (s) | {median(daemon_s):.2f} | {tar_s:.2f} "
                f"| {median(daemon_s) / tar_s:.2f} | — | — |"
            )
        cpu_commit = median([r["commit_cpu_seconds"] for r in runs])
        cpu_tar = median([r["tar_cpu_seconds"] for r in runs])
        lines.append(
            f"| … CPU time (user + sys): daemon + CLI vs tar + gzip + sha256sum, median (s) "
            f"| {cpu_commit:.2f} | {cpu_tar:.2f} | {cpu_commit / cpu_tar:.2f} | — | — |"
        )
        lines.append(
            "| … 1-minute load average after each run | "
            + " ".join(f"{r['load_average']:.1f}" for r in runs)
            + f" | (on {os.cpu_count()} CPUs) | | | |"
        )
        lines.append("| … per-run ratios | " + " ".join(f"{r['ratio']:.2f}" for r in runs) + " | | | | |")
    rebuild = res.get("rebuild")
    if rebuild:
        m = rebuild["rebuild_median"]
        met = "yes" if m < REBUILD_TARGET_S else "**NO**"
        lines.append(
            f"| unchanged rebuild of a 5-step Containerfile, CLI wall time, median of "
            f"{len(rebuild['rebuild_seconds'])} (s) | {m:.2f} | — | {m / REBUILD_TARGET_S:.2f} (of 1 s) "
            f"| < 1.00 | {met} |"
        )
    return "\n".join(lines)
