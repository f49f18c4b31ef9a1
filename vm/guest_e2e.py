"""The CRI checks of the VM test; runs INSIDE the guest against the installed, systemd-managed pycri.

    PYTHONPATH=<tree> /opt/pycri/bin/python vm/guest_e2e.py --summary /mnt/results/summary.txt

    ... --driver systemd --runtime runc --lifecycle

A docker-registry on 127.0.0.1 with a busybox image built by tests/support/images.py, then through
pycri's socket, with the cgroup driver pycri runs with (`--driver`, checked against RuntimeConfig) and
the OCI runtime chosen by the pod's runtime handler (`--runtime`): pull; a pod under the cgroup parent
kubelet would pass for that driver, with pod-level limits; a container with memory and CPU limits,
checked with pids.max in the guest's cgroupfs (cgroup v2), and where its cgroup and its conmon's are
(under systemd: the pod slice, the pycri-<id>.scope and pycri-conmon-<id>.scope units); exec, logs,
ContainerStats, an OOM kill (reported and counted in the pod's memory.events); with `--lifecycle`,
`systemctl restart pycri`, `kill -9` of pycri (systemd restarts it) and `systemctl stop pycri` with the
container surviving; stop and remove leaving no cgroup and no unit; under systemd, a pod slice systemd
refuses. Each check prints PASS or FAIL with the error; a failed check skips what depends on it.
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


def kill9_pycri(timeout: float) -> None:
    """SIGKILL pycri's main process and wait for systemd to start a new one (Restart=on-failure,
    RestartSec=5 in pycri.service)."""
    main_pid = sh("systemctl", "show", "-p", "MainPID", "--value", "pycri").strip()
    os.kill(int(main_pid), 9)
    wait_for(
        lambda: (
            subprocess.run(["systemctl", "is-active", "-q", "pycri"]).returncode == 0
            and sh("systemctl", "show", "-p", "MainPID", "--value", "pycri").strip() not in ("0", main_pid)
        ),
        timeout,
        "pycri restarted by systemd",
    )


def systemd_on_bus() -> bool:
    """systemd answers on the system bus (busctl goes through dbus-daemon, systemctl does not)."""
    out = subprocess.run(
        ["busctl", "--system", "get-property", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
         "org.freedesktop.systemd1.Manager", "Version"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return out.returncode == 0


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


def unit_show(unit: str, *props: str) -> dict[str, str]:
    out = sh("systemctl", "show", unit, *(f"-p{p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_gone(unit: str) -> bool:
    """systemd has forgotten the unit (not loaded, or only as a name with nothing behind it)."""
    shown = unit_show(unit, "LoadState", "ActiveState")
    return shown.get("LoadState") == "not-found" or shown.get("ActiveState") == "inactive"


def read_keyed(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--summary", type=Path)
    parser.add_argument("--driver", choices=("cgroupfs", "systemd"), default="cgroupfs")
    parser.add_argument("--runtime", choices=("crun", "runc"), default="crun")
    parser.add_argument("--lifecycle", action="store_true", help="also restart, kill -9 and stop pycri")
    parser.add_argument(
        "--sdrestart",
        action="store_true",
        help="also systemctl daemon-reexec and systemctl restart dbus with the pod running",
    )
    args = parser.parse_args()
    checks = Checks(args.summary)
    driver, runtime = args.driver, args.runtime
    tag = f"[{driver}/{runtime}]"
    work = Path(tempfile.mkdtemp(prefix="pycri-vm-"))
    logs = work / "logs"
    cri = CRIClient(SOCKET, timeout=60)

    def version() -> str:
        v = cri.version()
        config = cri.runtime_config()
        status = cri.status()
        conditions = {c.type: c.status for c in status.status.conditions}
        reported = pb.CgroupDriver.Name(config.linux.cgroup_driver)
        print(
            f"   {v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version}); "
            f"cgroup driver {reported}; conditions {conditions}"
        )
        assert all(conditions.values()), conditions
        assert reported == driver.upper(), f"RuntimeConfig says {reported}, pycri.toml says {driver}"
        return v.runtime_version

    checks.run(f"{tag} CRI Version, RuntimeConfig ({driver.upper()}), Status", version)

    with running_registry(work / "registry") as reg:
        image = f"{reg.host}/vm/busybox:1"

        def push() -> str:
            return push_image(reg, "vm/busybox", "1", busybox_image())

        checks.run(f"{tag} build and push a busybox image to docker-registry at {reg.host}", push)
        image_id = checks.run(f"{tag} PullImage {image}", lambda: cri.pull(image))
        if image_id is None:
            checks.skip(f"{tag} everything after the pull", "no image")
            return finish(checks)

        uid = f"{int(time.time())}_{driver}_{runtime}"
        # What kubelet passes for a BestEffort pod under each of its cgroup drivers.
        if driver == "systemd":
            parent = f"kubepods-besteffort-pod{uid}.slice"
            pod_cgroup = CGROUP_ROOT / f"kubepods.slice/kubepods-besteffort.slice/{parent}"
        else:
            parent = f"/kubepods/besteffort/pod{uid}"
            pod_cgroup = CGROUP_ROOT / parent.lstrip("/")
        pod_memory = 256 * 1024 * 1024

        def run_pod() -> str:
            config = cri.pod_config("vm-pod", uid=uid, log_directory=str(logs), cgroup_parent=parent)
            config.linux.resources.memory_limit_in_bytes = pod_memory
            config.linux.resources.cpu_period = 100000
            config.linux.resources.cpu_quota = 150000
            return cri.run_pod("vm-pod", runtime_handler=runtime, config=config)

        pod = checks.run(f"{tag} RunPodSandbox (cgroup parent {parent}, runtime handler {runtime})", run_pod)
        if pod is None:
            checks.skip(f"{tag} the containers", "no pod")
            return finish(checks)
        pod_id = str(pod)
        ip = checks.run(
            f"{tag} the pod has an IP on the pod network",
            lambda: cri.pod_status(pod_id).status.network.ip or fail(),
        )
        print(f"   pod {pod_id} ip {ip}")

        def pod_cgroup_check() -> None:
            memory_max = (pod_cgroup / "memory.max").read_text().strip()
            cpu_max = (pod_cgroup / "cpu.max").read_text().strip()
            print(f"   {pod_cgroup}: memory.max={memory_max} cpu.max={cpu_max}")
            assert memory_max == str(pod_memory), memory_max
            assert cpu_max == "150000 100000", cpu_max
            if driver == "systemd":
                shown = unit_show(parent, "ActiveState", "ControlGroup", "MemoryMax")
                print(f"   {parent}: {shown}")
                assert shown["ActiveState"] == "active", shown
                assert shown["ControlGroup"] == "/" + str(pod_cgroup.relative_to(CGROUP_ROOT)), shown

        checks.run(
            f"{tag} the pod cgroup is where kubelet expects it, with the pod's limits", pod_cgroup_check
        )

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

        created = checks.run(f"{tag} CreateContainer + StartContainer (memory 64 MiB, cpu 0.5)", create)
        if created is None:
            checks.skip(f"{tag} the container checks", "no container")
            cleanup_pod(checks, cri, pod_id, tag, driver, parent)
            return finish(checks)
        cid = str(created)
        scope, conmon_scope = f"pycri-{cid}.scope", f"pycri-conmon-{cid}.scope"

        def cgroup_limits() -> None:
            pid = container_pid(cri, cid)
            cgroup = cgroup_of(pid)
            print(f"   container pid {pid} in {cgroup}")
            monitor = json.loads(Path(f"/run/pycri/exec/{cid}/monitor.json").read_text())
            assert monitor["runtime"] == runtime, f"run by {monitor['runtime']}, wanted {runtime}"
            expected = pod_cgroup / (scope if driver == "systemd" else cid)
            # In the scope itself with crun too (pycri sets run.oci.systemd.subgroup to "").
            assert cgroup == expected, f"container cgroup {cgroup}, wanted {expected}"
            memory_max = (cgroup / "memory.max").read_text().strip()
            cpu_max = (cgroup / "cpu.max").read_text().strip()
            pids_max = (cgroup / "pids.max").read_text().strip()
            print(f"   memory.max={memory_max} cpu.max={cpu_max} pids.max={pids_max}")
            assert memory_max == str(memory_limit), f"memory.max is {memory_max}, wanted {memory_limit}"
            assert cpu_max == "50000 100000", f"cpu.max is {cpu_max!r}, wanted '50000 100000'"
            assert pids_max == "1024", f"pids.max is {pids_max}, wanted 1024 (pids_limit in pycri.toml)"
            conmon_pid = int(Path(f"/run/pycri/exec/{cid}/conmon.pid").read_text())
            conmon_cgroup = cgroup_of(conmon_pid)
            print(f"   conmon pid {conmon_pid} in {conmon_cgroup}")
            if driver == "systemd":
                shown = unit_show(scope, "ActiveState", "ControlGroup", "Slice")
                print(f"   {scope}: {shown}")
                assert shown["ActiveState"] == "active" and shown["Slice"] == parent, shown
                # conmon's memory is the pod's: it runs in a scope of the pod's slice.
                assert conmon_cgroup == pod_cgroup / conmon_scope, conmon_cgroup
                assert unit_show(conmon_scope, "ActiveState")["ActiveState"] == "active"
            else:
                # cgroupfs on a systemd host: conmon stays in pycri's service; no unit of pycri's own.
                assert conmon_cgroup == CGROUP_ROOT / "system.slice/pycri.service", conmon_cgroup
                assert unit_gone(scope) and unit_gone(conmon_scope)

        checks.run(
            f"{tag} container and conmon cgroups in the guest's cgroupfs (memory.max, cpu.max, pids.max)",
            cgroup_limits,
        )
        checks.run(
            f"{tag} ExecSync",
            lambda: exec_out(cri, cid, "sh", "-c", "echo exec-ok; id -u") == "exec-ok\n0\n" or fail("output"),
        )

        def log_lines() -> None:
            path = Path(cri.container_status(cid).status.log_path)
            text = wait_for(lambda: "hello from the vm" in path.read_text() and path.read_text(), 10, "log")
            print("   " + str(text).replace("\n", "\n   "))
            assert " stdout F hello from the vm" in str(text) and " stderr F to-stderr" in str(text)

        checks.run(f"{tag} the container's log (CRI format, stdout and stderr)", log_lines)

        def stats() -> None:
            response = cri.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid), timeout=30)
            usage = response.stats
            print(
                f"   cpu {usage.cpu.usage_core_nano_seconds.value} ns, "
                f"memory working set {usage.memory.working_set_bytes.value} B"
            )
            assert usage.cpu.usage_core_nano_seconds.value > 0 and usage.memory.working_set_bytes.value > 0
            assert (CGROUP_ROOT / "cpu.pressure").exists(), (
                "the guest's kernel keeps no PSI (CONFIG_PSI, psi=1)"
            )
            psi = {name: getattr(usage, name).psi for name in ("cpu", "memory", "io")}
            print(
                "   PSI: "
                + "; ".join(f"{n} some total {p.Some.Total} ns avg10 {p.Some.Avg10}" for n, p in psi.items())
            )
            assert all(p.HasField("Some") for p in psi.values()), psi
            assert psi["memory"].HasField("Full") and psi["io"].HasField("Full"), psi

        checks.run(f"{tag} ContainerStats reads the container's cgroup, PSI included", stats)

        def oom() -> None:
            events = pod_cgroup / "memory.events"
            before = read_keyed(events).get("oom_kill", 0)
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
            after = read_keyed(events).get("oom_kill", 0)
            print(f"   hog: exit {status.exit_code} reason {status.reason}; pod oom_kill {before} -> {after}")
            cri.remove_container(hog)
            assert after > before, f"memory.events oom_kill stayed {after}"
            assert status.exit_code == 137, status.exit_code
            if driver == "cgroupfs":
                assert status.reason == "OOMKilled", (status.exit_code, status.reason)
            elif status.reason != "OOMKilled":
                # conmon (Debian 12: 2.1.6) reads the scope's memory.events after the OOM; systemd
                # removes the scope as soon as it is empty, sometimes first (containers/conmon#426,
                # fixed in conmon's PR #581). Said here, not hidden: the summary keeps the line.
                checks.record(f"NOTE {tag} OOM-killed hog reported with reason {status.reason!r}: conmon#426")
            if driver == "systemd":
                assert unit_gone(f"pycri-{hog}.scope") and unit_gone(f"pycri-conmon-{hog}.scope")

        checks.run(
            f"{tag} a container over its memory limit: exit 137, oom_kill counted in the pod's memory.events"
            + (
                ", reason OOMKilled"
                if driver == "cgroupfs"
                else " (reason OOMKilled not asserted: conmon#426)"
            ),
            oom,
        )

        def survives(how: str) -> Callable[[], None]:
            def run() -> None:
                before = cri.container_status(cid).status
                pid = container_pid(cri, cid)
                if how == "restart":
                    sh("systemctl", "restart", "pycri")
                elif how == "stop":
                    sh("systemctl", "stop", "pycri")
                    # KillMode=process: only pycri stopped; the container and its conmon run on.
                    time.sleep(1)
                    assert os.path.exists(f"/proc/{pid}"), "the container died with systemctl stop pycri"
                    if driver == "systemd":
                        assert unit_show(scope, "ActiveState")["ActiveState"] == "active"
                    sh("systemctl", "start", "pycri")
                else:
                    kill9_pycri(90)
                assert os.path.exists(f"/proc/{pid}"), "the container's process died with pycri"
                after = wait_for(lambda: _status(cri, cid), 60, "ContainerStatus after the restart")
                assert after.state == pb.ContainerState.CONTAINER_RUNNING, after
                assert after.started_at == before.started_at
                assert exec_out(cri, cid, "echo", "still here") == "still here\n"
                assert cgroup_of(pid).is_relative_to(pod_cgroup / (scope if driver == "systemd" else cid))

            return run

        if args.lifecycle:
            checks.run(
                f"{tag} systemctl restart pycri: the container keeps running and is reported",
                survives("restart"),
            )
            checks.run(f"{tag} kill -9 pycri (systemd restarts it): the container survives", survives("kill"))
            checks.run(
                f"{tag} systemctl stop pycri leaves the container running (KillMode=process)",
                survives("stop"),
            )

        def systemd_restart() -> None:
            """systemd re-executes itself (as on a package upgrade): pods and containers keep running,
            stay reported, and pycri still makes and takes away units through D-Bus."""
            pid = container_pid(cri, cid)
            sh("systemctl", "daemon-reexec")
            wait_for(
                lambda: sh("systemctl", "is-system-running").strip() in ("running", "degraded"),
                60,
                "systemd back after daemon-reexec",
            )
            assert os.path.exists(f"/proc/{pid}"), "the container died with systemd's re-execution"
            assert unit_show(scope, "ActiveState")["ActiveState"] == "active"
            assert unit_show(parent, "ActiveState")["ActiveState"] == "active"
            assert state_of(cri, cid) == pb.ContainerState.CONTAINER_RUNNING
            assert exec_out(cri, cid, "echo", "after reexec") == "after reexec\n"
            other = cri.create_container(
                pod_id, "after-reexec", image, command=["sleep", "1000"], log_path="after-reexec.log"
            )
            cri.start_container(other)
            wait_for(lambda: state_of(cri, other) == pb.ContainerState.CONTAINER_RUNNING, 30, "running")
            assert unit_show(f"pycri-conmon-{other}.scope", "ActiveState")["ActiveState"] == "active"
            cri.stop_container(other, timeout=0)
            cri.remove_container(other)
            assert unit_gone(f"pycri-{other}.scope") and unit_gone(f"pycri-conmon-{other}.scope")

        if (args.lifecycle or args.sdrestart) and driver == "systemd":
            checks.run(
                f"{tag} systemctl daemon-reexec: the container keeps running, pycri still drives systemd",
                systemd_restart,
            )

        def dbus_restart() -> None:
            """The system bus goes away and comes back: pycri's D-Bus connection is lost, the
            container keeps running and stays reported, and pycri connects again for new units."""
            pid = container_pid(cri, cid)
            bus_pid = sh("systemctl", "show", "-P", "MainPID", "dbus.service").strip()
            sh("systemctl", "restart", "dbus.service")
            new_pid = sh("systemctl", "show", "-P", "MainPID", "dbus.service").strip()
            assert new_pid not in ("0", bus_pid), f"dbus-daemon not restarted ({bus_pid} -> {new_pid})"
            # systemd itself joins the new bus when dbus.service is up again.
            wait_for(systemd_on_bus, 60, "systemd on the new bus")
            assert os.path.exists(f"/proc/{pid}"), "the container died with the bus"
            assert unit_show(scope, "ActiveState")["ActiveState"] == "active"
            assert unit_show(parent, "ActiveState")["ActiveState"] == "active"
            assert state_of(cri, cid) == pb.ContainerState.CONTAINER_RUNNING
            listed = [c.id for c in cri.list_containers()]
            assert cid in listed, "the container is no longer listed"
            assert exec_out(cri, cid, "echo", "after dbus") == "after dbus\n"
            # A new container in the running pod: its scopes are made through a new connection.
            # No retry: the first call after the bus came back must reconnect by itself.
            other = cri.create_container(
                pod_id, "after-dbus", image, command=["sleep", "1000"], log_path="after-dbus.log"
            )
            cri.start_container(other)
            wait_for(lambda: state_of(cri, other) == pb.ContainerState.CONTAINER_RUNNING, 30, "running")
            assert unit_show(f"pycri-conmon-{other}.scope", "ActiveState")["ActiveState"] == "active"
            cri.stop_container(other, timeout=0)
            cri.remove_container(other)
            assert unit_gone(f"pycri-{other}.scope") and unit_gone(f"pycri-conmon-{other}.scope")
            # A new pod (a new slice) made and taken away through the new connection.
            uid2 = f"{uid}_afterdbus"
            parent2 = f"kubepods-besteffort-pod{uid2}.slice"
            config = cri.pod_config("vm-pod-2", uid=uid2, log_directory=str(logs), cgroup_parent=parent2)
            pod2 = cri.run_pod("vm-pod-2", runtime_handler=runtime, config=config)
            assert unit_show(parent2, "ActiveState")["ActiveState"] == "active"
            c2 = cri.create_container(pod2, "c2", image, command=["sleep", "1000"], log_path="c2.log")
            cri.start_container(c2)
            wait_for(lambda: state_of(cri, c2) == pb.ContainerState.CONTAINER_RUNNING, 30, "running")
            assert unit_show(f"pycri-{c2}.scope", "ActiveState")["ActiveState"] == "active"
            cri.stop_pod(pod2)
            cri.remove_pod(pod2)
            assert unit_gone(parent2) and unit_gone(f"pycri-{c2}.scope"), "units of the second pod left"

        if args.sdrestart and driver == "systemd":
            checks.run(
                f"{tag} systemctl restart dbus: the container keeps running and stays reported, "
                "pycri reconnects: a new container and a new pod made and removed",
                dbus_restart,
            )

        def stop_remove() -> None:
            cri.stop_container(cid, timeout=5)
            status = cri.container_status(cid).status
            assert status.state == pb.ContainerState.CONTAINER_EXITED, status.state
            cri.remove_container(cid)
            if driver == "systemd":
                assert unit_gone(scope), unit_show(scope, "LoadState", "ActiveState")
                assert unit_gone(conmon_scope), unit_show(conmon_scope, "LoadState", "ActiveState")
            assert not (pod_cgroup / (scope if driver == "systemd" else cid)).exists()

        checks.run(f"{tag} StopContainer + RemoveContainer (no cgroup or unit left)", stop_remove)
        cleanup_pod(checks, cri, pod_id, tag, driver, parent)
        if driver == "systemd":
            checks.run(f"{tag} systemd refusing the pod slice fails RunPodSandbox, nothing left", unit_clash)
        checks.run(f"{tag} RemoveImage", lambda: cri.remove_image(image))
    cri.close()
    return finish(checks)


def unit_clash() -> None:
    """A slice that systemd already has a unit file for cannot be made transient: FAILED_PRECONDITION."""
    import grpc

    name = f"kubepods-besteffort-podclash{int(time.time())}.slice"
    unit_file = Path("/run/systemd/system") / name
    unit_file.write_text("[Unit]\nDescription=in the way of pycri\n")
    sh("systemctl", "daemon-reload")
    cri = CRIClient(SOCKET, timeout=60)
    pods_before = {p.id for p in cri.list_pods()}
    sandboxes_before = set(os.listdir("/run/pycri/sandboxes"))
    try:
        try:
            cri.run_pod("vm-clash", uid=f"clash{int(time.time())}", cgroup_parent=name)
        except grpc.RpcError as exc:
            print(f"   {exc.code().name}: {exc.details()}")
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.code()
            assert name in (exc.details() or ""), exc.details()
        else:
            raise AssertionError("RunPodSandbox succeeded")
        assert {p.id for p in cri.list_pods()} == pods_before, "a pod was left"
        assert set(os.listdir("/run/pycri/sandboxes")) == sandboxes_before, "a sandbox directory was left"
    finally:
        unit_file.unlink()
        sh("systemctl", "daemon-reload")
        cri.close()


def _status(cri: CRIClient, cid: str) -> pb.ContainerStatus | None:
    try:
        return cri.container_status(cid).status
    except Exception:
        return None


def cleanup_pod(checks: Checks, cri: CRIClient, pod_id: str, tag: str, driver: str, parent: str) -> None:
    def run() -> None:
        cgroups_before = {p for p in CGROUP_ROOT.rglob(f"*{pod_id}*") if p.is_dir()}
        if driver == "systemd":
            cgroups_before |= {p for p in CGROUP_ROOT.rglob(parent) if p.is_dir()}
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)
        left = [str(p) for p in cgroups_before if p.exists()]
        assert not left, f"cgroups left: {left}"
        if driver == "systemd":
            # pycri made the slice (no kubelet made it first), so pycri takes it away.
            assert unit_gone(parent), unit_show(parent, "LoadState", "ActiveState")
            units = sh(
                "systemctl", "list-units", "--all", "--no-legend", "--plain",
                "pycri-*.scope", "pycri-pod*.slice", "kubepods-*pod*.slice",
            )  # fmt: skip
            assert not units.strip(), f"units left: {units}"

    checks.run(f"{tag} StopPodSandbox + RemovePodSandbox (no cgroup or unit left)", run)


def fail(what: str = "empty") -> None:
    raise AssertionError(what)


def finish(checks: Checks) -> int:
    if checks.failed:
        print(f"{len(checks.failed)} CRI check(s) failed: {checks.failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
