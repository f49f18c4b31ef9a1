"""The CRI checks of the s390x VM test; runs INSIDE the s390x guest against the installed pycri.

    PYTHONPATH=<tree> /opt/pycri/bin/python vm/guest_s390x.py --summary S --busybox-amd64 PATH

"The same guest, smaller" (issue #10): a docker-registry on 127.0.0.1 gets a multi-platform image, an
OCI image index with an amd64 manifest (busybox from the host, carried in the payload) listed before
an s390x one (the guest's own busybox-static); pycri must pull the s390x one (the image ID is the
s390x config's digest, ImageStatus's config says s390x, and the container's `uname -m` says s390x).
Then a pod with a container under crun and one under runc (the pod's runtime handler; monitor.json
says which ran): exec, the CRI-format log; with crun also `systemctl restart pycri` and a `kill -9` of
pycri (systemd restarts it) with the container surviving, reported running with the same start time;
stop and remove of everything. The helpers come from vm/guest_e2e.py (the amd64 checks).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from guest_e2e import (
    SOCKET,
    Checks,
    _status,
    container_pid,
    exec_out,
    finish,
    kill9_pycri,
    sh,
    state_of,
    wait_for,
)

import tests.support.images as images
from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from tests.support.images import Image, busybox_image, index_children, push_index
from tests.support.registry import running_registry


def amd64_busybox(path: Path) -> Image:
    """The busybox image made from an amd64 busybox binary instead of the guest's own."""
    own = images.BUSYBOX_PATH
    images.BUSYBOX_PATH = path
    try:
        layer = images.busybox_layer.__wrapped__()
    finally:
        images.BUSYBOX_PATH = own
    return Image.build([layer], cmd=["sh"], architecture="amd64")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--summary", type=Path)
    parser.add_argument("--busybox-amd64", type=Path, required=True)
    args = parser.parse_args()
    checks = Checks(args.summary)
    work = Path(tempfile.mkdtemp(prefix="pycri-vm-"))
    logs = work / "logs"
    # Everything is slower under TCG s390x: generous RPC timeouts.
    cri = CRIClient(SOCKET, timeout=180)

    def version() -> None:
        v = cri.version()
        conditions = {c.type: c.status for c in cri.status().status.conditions}
        print(
            f"   {v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version}); conditions {conditions}"
        )
        assert all(conditions.values()), conditions

    checks.run("[s390x] CRI Version and Status (runtime and network ready)", version)

    entries = [
        (amd64_busybox(args.busybox_amd64), {"architecture": "amd64", "os": "linux"}),
        (busybox_image(architecture="s390x"), {"architecture": "s390x", "os": "linux"}),
    ]
    children = index_children(entries)
    s390x_config = children[1][0].config_digest
    with running_registry(work / "registry") as reg:
        image = f"{reg.host}/vm/busybox:multi"

        def push() -> None:
            digest = push_index(reg, "vm/busybox", "multi", entries)
            print(
                f"   index {digest}: "
                + ", ".join(f"{p['architecture']} {i.config_digest}" for i, p in children)
            )

        checks.run(
            f"[s390x] push an image index (amd64 + s390x busybox) to docker-registry at {reg.host}", push
        )

        def pull() -> str:
            image_id = cri.pull(image)
            status = cri.image_status(image, verbose=True)
            config = json.loads(status.info["info"])["imageSpec"]
            print(f"   pulled {image_id}; config architecture {config.get('architecture')}")
            assert config.get("architecture") == "s390x", config.get("architecture")
            assert image_id == s390x_config, f"image {image_id}, the s390x config is {s390x_config}"
            return image_id

        if checks.run(f"[s390x] PullImage {image} picks the s390x manifest", pull) is None:
            checks.skip("[s390x] everything after the pull", "no image")
            return finish(checks)

        for runtime in ("crun", "runc"):
            pod_and_container(checks, cri, image, runtime, logs, lifecycle=runtime == "crun")
        checks.run("[s390x] RemoveImage", lambda: cri.remove_image(image))
    cri.close()
    return finish(checks)


def pod_and_container(
    checks: Checks, cri: CRIClient, image: str, runtime: str, logs: Path, *, lifecycle: bool
) -> None:
    tag = f"[s390x/{runtime}]"
    uid = f"{int(time.time())}_s390x_{runtime}"

    def run_pod() -> str:
        config = cri.pod_config(f"vm-{runtime}", uid=uid, log_directory=str(logs / runtime))
        return cri.run_pod(f"vm-{runtime}", runtime_handler=runtime, config=config)

    pod = checks.run(f"{tag} RunPodSandbox (runtime handler {runtime})", run_pod)
    if pod is None:
        checks.skip(f"{tag} the container", "no pod")
        return
    pod_id = str(pod)

    def create() -> str:
        cid = cri.create_container(
            pod_id,
            "sleeper",
            image,
            command=["sh", "-c", "echo hello from s390x; echo to-stderr >&2; exec sleep 100000"],
            log_path="sleeper.log",
        )
        cri.start_container(cid)
        wait_for(lambda: state_of(cri, cid) == pb.ContainerState.CONTAINER_RUNNING, 120, "running")
        monitor = json.loads(Path(f"/run/pycri/exec/{cid}/monitor.json").read_text())
        assert monitor["runtime"] == runtime, f"run by {monitor['runtime']}, wanted {runtime}"
        return cid

    created = checks.run(f"{tag} CreateContainer + StartContainer, run by {runtime}", create)
    if created is None:
        checks.skip(f"{tag} the container checks", "no container")
    else:
        cid = str(created)
        checks.run(
            f"{tag} ExecSync: uname -m in the container says s390x",
            lambda: exec_out(cri, cid, "uname", "-m") == "s390x\n" or _fail("not s390x"),
        )

        def log_lines() -> None:
            path = Path(cri.container_status(cid).status.log_path)
            text = wait_for(lambda: "hello from s390x" in path.read_text() and path.read_text(), 30, "log")
            print("   " + str(text).replace("\n", "\n   "))
            assert " stdout F hello from s390x" in str(text) and " stderr F to-stderr" in str(text)

        checks.run(f"{tag} the container's log (CRI format, stdout and stderr)", log_lines)
        if lifecycle:
            checks.run(
                f"{tag} systemctl restart pycri: the container keeps running and is reported",
                survives(cri, cid, "restart"),
            )
            checks.run(
                f"{tag} kill -9 pycri (systemd restarts it): the container survives",
                survives(cri, cid, "kill"),
            )

        def stop_remove() -> None:
            cri.stop_container(cid, timeout=5)
            assert state_of(cri, cid) == pb.ContainerState.CONTAINER_EXITED
            cri.remove_container(cid)

        checks.run(f"{tag} StopContainer + RemoveContainer", stop_remove)

    def remove_pod() -> None:
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)
        assert pod_id not in {p.id for p in cri.list_pods()}

    checks.run(f"{tag} StopPodSandbox + RemovePodSandbox", remove_pod)


def survives(cri: CRIClient, cid: str, how: str) -> Callable[[], None]:
    def run() -> None:
        before = cri.container_status(cid).status
        pid = container_pid(cri, cid)
        if how == "restart":
            sh("systemctl", "restart", "pycri")
        else:
            kill9_pycri(300)
        assert os.path.exists(f"/proc/{pid}"), "the container's process died with pycri"
        after = wait_for(lambda: _status(cri, cid), 180, "ContainerStatus after the restart")
        assert after.state == pb.ContainerState.CONTAINER_RUNNING, after
        assert after.started_at == before.started_at
        assert exec_out(cri, cid, "uname", "-m") == "s390x\n"

    return run


def _fail(what: str) -> None:
    raise AssertionError(what)


if __name__ == "__main__":
    import sys

    sys.exit(main())
