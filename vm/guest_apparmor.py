"""The AppArmor checks of the VM test; runs INSIDE the guest (Debian's kernel has AppArmor on)
against the installed, systemd-managed pycri, after vm/guest_e2e.py.

    PYTHONPATH=<tree> /opt/pycri/bin/python vm/guest_apparmor.py --summary /mnt/results/summary.txt

Checks: AppArmor is on and pycri loaded pycri-default at start (and `pycri check` says so); a
container under the default profile runs as `pycri-default (enforce)`, cannot write
/proc/sysrq-trigger and cannot mount even with CAP_SYS_ADMIN, and its exec sessions (ExecSync, and
Exec through the streaming server over WebSocket) carry the profile; an Unconfined container can
do both; a localhost/ profile loaded here that denies writes to /etc is enforced (both the
SecurityProfile field and the deprecated string); a Localhost profile that is not loaded is
FailedPrecondition and leaves nothing; pycri-default removed from the kernel is loaded again by
the next container that needs it.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import struct
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import grpc

# This script's directory is first on sys.path: the e2e driver's helpers.
from guest_e2e import SOCKET, Checks, container_pid, exec_out, fail, finish

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from cri_runtime.host.mounts import mounts_under
from tests.support.images import busybox_image, push_image
from tests.support.registry import running_registry

PROFILES = Path("/sys/kernel/security/apparmor/profiles")
LOCAL_PROFILE = "pycri-test-deny-etc"
# A profile such as kubelet's users load: everything but writes below /etc.
LOCAL_PROFILE_TEXT = f"""profile {LOCAL_PROFILE} flags=(attach_disconnected,mediate_deleted) {{
  file,
  network,
  capability,
  signal,
  deny /etc/** w,
}}
"""
# Each applies the profile itself (crun: before exec; runc: through its init); both are checked.
RUNTIMES = ("crun", "runc")
STATE_DIRS = (Path("/var/lib/pycri/containers"), Path("/run/pycri/containers"))


def loaded() -> dict[str, str]:
    found = {}
    for line in PROFILES.read_text().splitlines():
        name, _, mode = line.rpartition(" (")
        found[name] = mode.rstrip(")")
    return found


def parser(*args: str, text: str) -> None:
    out = subprocess.run(["apparmor_parser", *args], input=text, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"apparmor_parser {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")


def attempt(cri: CRIClient, cid: str, script: str) -> tuple[int, str]:
    result = cri.exec_sync(cid, ["sh", "-c", script], timeout=20)
    return result.exit_code, (result.stdout + result.stderr).decode(errors="replace").strip()


def streaming_exec(cri: CRIClient, cid: str, cmd: list[str]) -> bytes:
    """stdout of an Exec session through pycri's streaming server (WebSocket, v4.channel.k8s.io),
    the way kubectl exec reaches a container."""
    url = cri.runtime.Exec(pb.ExecRequest(container_id=cid, cmd=cmd, stdout=True), timeout=20).url
    parts = urllib.parse.urlsplit(url)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    )
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(request.encode())
        stream = sock.makefile("rb")
        status = stream.readline()
        assert b" 101 " in status, status
        while stream.readline() not in (b"\r\n", b""):
            pass
        stdout = b""
        while header := stream.read(2):
            length = header[1] & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", stream.read(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", stream.read(8))
            payload = stream.read(length)
            if header[0] & 0x0F == 8:  # close
                break
            if payload[:1] == b"\x01":  # channel 1: stdout
                stdout += payload[1:]
    return stdout


def main() -> int:
    parser_args = argparse.ArgumentParser()
    parser_args.add_argument("--summary", type=Path)
    args = parser_args.parse_args()
    checks = Checks(args.summary)
    work = Path(tempfile.mkdtemp(prefix="pycri-vm-apparmor-"))
    cri = CRIClient(SOCKET, timeout=60)

    def host_has_apparmor() -> None:
        enabled = Path("/sys/module/apparmor/parameters/enabled").read_text().strip()
        lsms = Path("/sys/kernel/security/lsm").read_text().strip()
        print(f"   enabled={enabled} lsm={lsms} cmdline={Path('/proc/cmdline').read_text().strip()}")
        assert enabled == "Y", enabled
        modes = loaded()
        print(f"   {len(modes)} profiles loaded; pycri-default: {modes.get('pycri-default')}")
        assert modes.get("pycri-default") == "enforce", "pycri did not load pycri-default at start"
        report = subprocess.run(["pycri", "check"], capture_output=True, text=True).stdout
        lines = [line for line in report.splitlines() if "lsm" in line]
        print("   " + "\n   ".join(lines))
        assert any(
            "AppArmor is enabled" in line and "pycri-default loaded (enforce)" in line for line in lines
        )

    if (
        checks.run("AppArmor is on, pycri-default loaded at start, pycri check says so", host_has_apparmor)
        is None
    ):
        checks.skip("the AppArmor containers", "AppArmor is not on in the guest")
        return finish(checks)

    with running_registry(work / "registry") as reg:
        image = f"{reg.host}/vm/busybox-aa:1"
        if (
            checks.run(
                "push and pull busybox",
                lambda: (push_image(reg, "vm/busybox-aa", "1", busybox_image()), cri.pull(image)),
            )
            is None
        ):
            return finish(checks)
        pods: list[str] = []
        pod_id = ""  # the pod container() creates in: one per OCI runtime, in turn

        def container(name: str, profile: pb.SecurityProfile | None = None, legacy: str = "") -> str:
            config = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name=name),
                image=pb.ImageSpec(image=image),
                command=["sleep", "100000"],
                log_path=f"{name}.log",
            )
            security = config.linux.security_context
            if profile is not None:
                security.apparmor.CopyFrom(profile)
            security.apparmor_profile = legacy
            # CAP_SYS_ADMIN, so that only AppArmor stands between the container and mount; and
            # /proc/sysrq-trigger not bound read-only (the default read-only paths replaced), so
            # that only AppArmor stands between it and a write.
            security.capabilities.add_capabilities.append("CAP_SYS_ADMIN")
            security.readonly_paths.append("/proc/bus")
            cid = cri.create_container(pod_id, name, image, config=config)
            cri.start_container(cid)
            return cid

        for runtime in RUNTIMES:
            pod = checks.run(
                f"[{runtime}] RunPodSandbox (runtime handler {runtime})",
                lambda runtime=runtime: cri.run_pod(
                    f"aa-{runtime}", runtime_handler=runtime, log_directory=str(work / "logs")
                ),
            )
            if pod is None:
                continue
            pod_id = str(pod)
            pods.append(pod_id)

            def default_profile() -> None:
                cid = container("default")  # no profile asked for: the runtime's default
                pid = container_pid(cri, cid)
                attr = Path(f"/proc/{pid}/attr/current").read_text().strip()
                print(f"   container pid {pid}: {attr}")
                assert attr == "pycri-default (enforce)", attr
                exec_attr = exec_out(cri, cid, "cat", "/proc/self/attr/current").strip()
                assert exec_attr == "pycri-default (enforce)", f"ExecSync: {exec_attr}"
                session = streaming_exec(cri, cid, ["cat", "/proc/self/attr/current"]).decode().strip()
                print(f"   ExecSync: {exec_attr}; Exec (streaming): {session}")
                assert session == "pycri-default (enforce)", f"Exec session: {session}"
                rc, out = attempt(cri, cid, "echo h > /proc/sysrq-trigger")
                print(f"   write /proc/sysrq-trigger: exit {rc}: {out}")
                assert rc != 0 and "Permission denied" in out, (rc, out)
                rc, out = attempt(cri, cid, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m")
                print(f"   mount -t tmpfs none /tmp/m: exit {rc}: {out}")
                assert rc != 0 and "Permission denied" in out, (rc, out)
                rc, out = attempt(cri, cid, "echo 1 > /proc/sys/vm/drop_caches")
                print(f"   write /proc/sys/vm/drop_caches: exit {rc}: {out}")
                assert rc != 0, (rc, out)
                cri.stop_container(cid, timeout=2)
                cri.remove_container(cid)

            checks.run(
                f"[{runtime}] default profile: pycri-default (enforce) in the container, ExecSync and Exec; "
                "no sysrq-trigger, no mount",
                default_profile,
            )

            def unconfined() -> None:
                cid = container("free", pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined))
                attr = exec_out(cri, cid, "cat", "/proc/self/attr/current").strip()
                assert attr == "unconfined", attr
                mount = "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m && grep ' /tmp/m ' /proc/mounts"
                rc, out = attempt(cri, cid, mount)
                print(f"   mount: exit {rc}: {out}")
                assert rc == 0 and "tmpfs" in out, (rc, out)
                rc, out = attempt(
                    cri, cid, "echo h > /proc/sysrq-trigger"
                )  # h: the help text, to the kernel log
                assert rc == 0, (rc, out)
                cri.stop_container(cid, timeout=2)
                cri.remove_container(cid)

            checks.run(
                f"[{runtime}] Unconfined: unconfined; mount and sysrq-trigger allowed (else the same)",
                unconfined,
            )

            def localhost() -> None:
                parser("-r", text=LOCAL_PROFILE_TEXT)
                assert loaded().get(LOCAL_PROFILE) == "enforce"
                by_field = pb.SecurityProfile(
                    profile_type=pb.SecurityProfile.Localhost, localhost_ref=LOCAL_PROFILE
                )
                for name, profile, legacy in (
                    ("local", by_field, ""),
                    ("local-legacy", None, f"localhost/{LOCAL_PROFILE}"),
                ):
                    cid = container(name, profile, legacy)
                    attr = exec_out(cri, cid, "cat", "/proc/self/attr/current").strip()
                    assert attr == f"{LOCAL_PROFILE} (enforce)", attr
                    session = streaming_exec(cri, cid, ["cat", "/proc/self/attr/current"]).decode().strip()
                    assert session == f"{LOCAL_PROFILE} (enforce)", f"Exec session: {session}"
                    rc, out = attempt(cri, cid, "touch /etc/denied")
                    print(f"   {name}: touch /etc/denied: exit {rc}: {out}")
                    assert rc != 0 and "Permission denied" in out, (rc, out)
                    rc, out = attempt(cri, cid, "touch /tmp/allowed && echo written")
                    assert rc == 0 and out == "written", (rc, out)
                    cri.stop_container(cid, timeout=2)
                    cri.remove_container(cid)

            checks.run(
                f"[{runtime}] localhost/{LOCAL_PROFILE} (no writes to /etc) is enforced, field and string",
                localhost,
            )

        if not pods:
            return finish(checks)

        def not_loaded() -> None:
            dirs_before = {str(p) for d in STATE_DIRS for p in d.iterdir()}
            mounts_before = mounts_under(Path("/run/pycri")) + mounts_under(Path("/var/lib/pycri"))
            missing = pb.SecurityProfile(
                profile_type=pb.SecurityProfile.Localhost, localhost_ref="pycri-not-loaded"
            )
            try:
                container("ghost", missing)
            except grpc.RpcError as exc:
                print(f"   {exc.code()}: {exc.details()}")
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.code()
                assert "'pycri-not-loaded' is not loaded" in (exc.details() or "")
            else:
                fail("the container was created")
            assert not [c for c in cri.list_containers() if c.metadata.name == "ghost"]
            # Nothing new (the files of containers removed just before may still be going away:
            # RemoveContainer removes them after it returns).
            made = {str(p) for d in STATE_DIRS for p in d.iterdir()} - dirs_before
            assert not made, f"left: {made}"
            mounted = set(mounts_under(Path("/run/pycri")) + mounts_under(Path("/var/lib/pycri"))) - set(
                mounts_before
            )
            assert not mounted, f"left mounted: {mounted}"

        checks.run("a Localhost profile that is not loaded: FailedPrecondition, nothing left", not_loaded)

        def reloaded() -> None:
            # What an AppArmor reload does to pycri-default: gone from the kernel.
            Path("/sys/kernel/security/apparmor/.remove").write_text("pycri-default")
            assert "pycri-default" not in loaded()
            cid = container("after-reload")
            assert loaded().get("pycri-default") == "enforce", "not loaded again"
            attr = exec_out(cri, cid, "cat", "/proc/self/attr/current").strip()
            assert attr == "pycri-default (enforce)", attr
            cri.stop_container(cid, timeout=2)
            cri.remove_container(cid)

        checks.run("pycri-default removed from the kernel is loaded again at the next create", reloaded)
        for each in pods:
            checks.run(
                f"StopPodSandbox + RemovePodSandbox {each[:12]}",
                lambda each=each: (cri.stop_pod(each), cri.remove_pod(each)),
            )
        checks.run("RemoveImage", lambda: cri.remove_image(image))
    try:
        parser("-R", text=LOCAL_PROFILE_TEXT)
    except RuntimeError as exc:
        print(f"   unloading {LOCAL_PROFILE}: {exc}")
    cri.close()
    return finish(checks)


if __name__ == "__main__":
    sys.exit(main())
