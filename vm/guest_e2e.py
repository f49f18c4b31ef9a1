"""The CRI checks of the VM test; runs INSIDE the guest against the installed, systemd-managed pycri.

    PYTHONPATH=<tree> /opt/pycri/bin/python vm/guest_e2e.py --summary /mnt/results/summary.txt

A docker-registry on 127.0.0.1 with a busybox image built by tests/support/images.py, then through
pycri's socket: pull, a pod, a container with memory, CPU and pids limits checked in the guest's
cgroupfs (cgroup v2), exec, logs, an OOM kill, `systemctl restart pycri` with the container surviving,
`kill -9` of pycri (systemd restarts it) with the container surviving, stop and remove. Each check
prints PASS or FAIL with the error; a failed check skips the checks that need what it should have made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from tests.support.images import busybox_image, push_image
from tests.support.registry import running_registry

SOCKET = "unix:///run/pycri/pycri.sock"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Checks:
    def __init__(self, summary: Path | None) -> None:
        self.summary = summary
        self.failed: list[str] = []

    def record(self, line: str) -> None:
        print(line, flush=True)
        if self.summary is not None:
            with self.summary.open("a") as f:
                f.write(line + "\n")

    def run(self, name: str, fn: Callable[[], object]) -> object:
        """Run one check: its value, or None when it failed (the caller skips what depends on it)."""
        print(f"-- {name}", flush=True)
        started = time.monotonic()
        try:
            value = fn()
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}".replace("\n", " | ")
            traceback.print_exc()
            self.record(f"FAIL {name}: {detail[:600]}")
            self.failed.append(name)
            return None
        self.record(f"PASS {name} ({time.monotonic() - started:.1f}s)")
        return value if value is not None else True

    def skip(self, name: str, why: str) -> None:
        self.record(f"SKIP {name}: {why}")


def wait_for(fn: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout}s")


def sh(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip() or out.stdout.strip()}"
        )
    return out.stdout


def container_pid(cri: CRIClient, cid: str) -> int:
    return int(json.loads(cri.container_status(cid, verbose=True).info["info"])["pid"])


def cgroup_of(pid: int) -> Path:
    """The cgroup v2 directory of a process, from /proc/PID/cgroup ("0::/path")."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    unified = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    if len(lines) != 1 or not unified:
        raise AssertionError(f"/proc/{pid}/cgroup is not cgroup v2 only: {lines}")
    return CGROUP_ROOT / unified[0].lstrip("/")


def exec_out(cri: CRIClient, cid: str, *cmd: str) -> str:
    result = cri.exec_sync(cid, list(cmd), timeout=20)
    if result.exit_code != 0:
        raise AssertionError(f"exec {cmd}: exit {result.exit_code}: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode()


def state_of(cri: CRIClient, cid: str) -> int:
    return cri.container_status(cid).status.state


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args()
    checks = Checks(args.summary)
    work = Path(tempfile.mkdtemp(prefix="pycri-vm-"))
    logs = work / "logs"
    cri = CRIClient(SOCKET, timeout=60)

    def version() -> str:
        v = cri.version()
        config = cri.runtime_config()
        status = cri.status()
        conditions = {c.type: c.status for c in status.status.conditions}
        print(
            f"   {v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version}); "
            f"cgroup driver {pb.CgroupDriver.Name(config.linux.cgroup_driver)}; conditions {conditions}"
        )
        assert all(conditions.values()), conditions
        return v.runtime_version

    checks.run("CRI Version, RuntimeConfig, Status (RuntimeReady, NetworkReady)", version)

    with running_registry(work / "registry") as reg:
        image = f"{reg.host}/vm/busybox:1"

        def push() -> str:
            return push_image(reg, "vm/busybox", "1", busybox_image())

        checks.run(f"build and push a busybox image to docker-registry at {reg.host}", push)
        image_id = checks.run(f"PullImage {image}", lambda: cri.pull(image))
        if image_id is None:
            checks.skip("everything after the pull", "no image")
            return finish(checks)
        checks.run(
            "ListImages has it", lambda: [i for i in cri.list_images() if image in i.repo_tags] or fail()
        )

        pod = checks.run("RunPodSandbox", lambda: cri.run_pod("vm-pod", log_directory=str(logs)))
        if pod is None:
            checks.skip("the containers", "no pod")
            return finish(checks)
        pod_id = str(pod)
        ip = checks.run(
            "the pod has an IP on the pod network", lambda: cri.pod_status(pod_id).status.network.ip or fail()
        )
        print(f"   pod {pod_id} ip {ip}")

        memory_limit = 64 * 1024 * 1024

        def create() -> str:
            config = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="sleeper"),
                image=pb.ImageSpec(image=image),
                command=["sh", "-c", "echo hello from the vm; echo to-stderr >&2; exec sleep 100000"],
                log_path="sleeper.log",
            )
            resources = config.linux.resources
            resources.memory_limit_in_bytes = memory_limit
            resources.cpu_period = 100000
            resources.cpu_quota = 50000
            cid = cri.create_container(pod_id, "sleeper", image, config=config)
            cri.start_container(cid)
            wait_for(lambda: state_of(cri, cid) == pb.ContainerState.CONTAINER_RUNNING, 30, "running")
            return cid

        created = checks.run("CreateContainer + StartContainer (memory 64 MiB, cpu 0.5)", create)
        if created is None:
            checks.skip("the container checks", "no container")
            cleanup_pod(checks, cri, pod_id)
            return finish(checks)
        cid = str(created)

        def cgroup_limits() -> None:
            pid = container_pid(cri, cid)
            cgroup = cgroup_of(pid)
            print(f"   container pid {pid} in {cgroup}")
            memory_max = (cgroup / "memory.max").read_text().strip()
            cpu_max = (cgroup / "cpu.max").read_text().strip()
            print(f"   memory.max={memory_max} cpu.max={cpu_max}")
            assert memory_max == str(memory_limit), f"memory.max is {memory_max}, wanted {memory_limit}"
            assert cpu_max == "50000 100000", f"cpu.max is {cpu_max!r}, wanted '50000 100000'"

        checks.run("the limits are in the guest's cgroupfs (memory.max, cpu.max)", cgroup_limits)
        checks.run(
            "ExecSync",
            lambda: exec_out(cri, cid, "sh", "-c", "echo exec-ok; id -u") == "exec-ok\n0\n" or fail("output"),
        )

        def log_lines() -> None:
            path = Path(cri.container_status(cid).status.log_path)
            text = wait_for(lambda: "hello from the vm" in path.read_text() and path.read_text(), 10, "log")
            print("   " + str(text).replace("\n", "\n   "))
            assert " stdout F hello from the vm" in str(text) and " stderr F to-stderr" in str(text)

        checks.run("the container's log (CRI format, stdout and stderr)", log_lines)

        def oom() -> None:
            config = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="hog"),
                image=pb.ImageSpec(image=image),
                command=["sh", "-c", "head -c 200000000 /dev/zero | tail -c 190000000 > /dev/null"],
                log_path="hog.log",
            )
            config.linux.resources.memory_limit_in_bytes = 32 * 1024 * 1024
            hog = cri.create_container(pod_id, "hog", image, config=config)
            cri.start_container(hog)
            wait_for(lambda: state_of(cri, hog) == pb.ContainerState.CONTAINER_EXITED, 60, "hog exit")
            status = cri.container_status(hog).status
            print(f"   hog: exit {status.exit_code} reason {status.reason}")
            cri.remove_container(hog)
            assert status.reason == "OOMKilled", (status.exit_code, status.reason)

        checks.run("a container over its memory limit is OOMKilled", oom)

        def survives(how: str) -> Callable[[], None]:
            def run() -> None:
                before = cri.container_status(cid).status
                pid = container_pid(cri, cid)
                if how == "restart":
                    sh("systemctl", "restart", "pycri")
                else:
                    main_pid = sh("systemctl", "show", "-p", "MainPID", "--value", "pycri").strip()
                    os.kill(int(main_pid), 9)
                    # Restart=on-failure, RestartSec=5: systemd starts it again.
                    wait_for(
                        lambda: (
                            subprocess.run(["systemctl", "is-active", "-q", "pycri"]).returncode == 0
                            and sh("systemctl", "show", "-p", "MainPID", "--value", "pycri").strip()
                            not in ("0", main_pid)
                        ),
                        90,
                        "pycri restarted by systemd",
                    )
                assert os.path.exists(f"/proc/{pid}"), "the container's process died with pycri"
                after = wait_for(lambda: _status(cri, cid), 60, "ContainerStatus after the restart")
                assert after.state == pb.ContainerState.CONTAINER_RUNNING, after
                assert after.started_at == before.started_at
                assert exec_out(cri, cid, "echo", "still here") == "still here\n"

            return run

        checks.run(
            "systemctl restart pycri: the container keeps running and is reported", survives("restart")
        )
        checks.run("kill -9 pycri (systemd restarts it): the container survives", survives("kill"))

        def stop_remove() -> None:
            cri.stop_container(cid, timeout=5)
            status = cri.container_status(cid).status
            assert status.state == pb.ContainerState.CONTAINER_EXITED, status.state
            cri.remove_container(cid)

        checks.run("StopContainer + RemoveContainer", stop_remove)
        cleanup_pod(checks, cri, pod_id)
        checks.run("RemoveImage", lambda: cri.remove_image(image))
    cri.close()
    return finish(checks)


def _status(cri: CRIClient, cid: str) -> pb.ContainerStatus | None:
    try:
        return cri.container_status(cid).status
    except Exception:
        return None


def cleanup_pod(checks: Checks, cri: CRIClient, pod_id: str) -> None:
    def run() -> None:
        cgroups_before = {p for p in CGROUP_ROOT.rglob(f"*{pod_id}*") if p.is_dir()}
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)
        left = [str(p) for p in cgroups_before if p.exists()]
        assert not left, f"cgroups left: {left}"

    checks.run("StopPodSandbox + RemovePodSandbox (no cgroup left)", run)


def fail(what: str = "empty") -> None:
    raise AssertionError(what)


def finish(checks: Checks) -> int:
    if checks.failed:
        print(f"{len(checks.failed)} CRI check(s) failed: {checks.failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
