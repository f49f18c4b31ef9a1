"""The checkpoint/restore checks of the VM test; runs INSIDE the guest (Debian's 6.1 kernel, where
Debian's CRIU works) against the installed, systemd-managed pycri.

    PYTHONPATH=<tree> /opt/pycri/bin/python vm/guest_checkpoint.py --summary /mnt/results/summary.txt

Checks: `pycri check` says CRIU works; for each OCI runtime that can checkpoint (runc; crun only when
built with +CRIU, else SKIP with the reason): a container counting in a shell variable (its state in
memory) that wrote a file to its rootfs is checkpointed to an archive with CRI-O's members while it
keeps running; a new pod's container created from that archive restores: the file is there and the
counter continues from where it was (it does not start again at 1); the same archive made into a
checkpoint OCI image (`pycri checkpoint-image`), pushed to the in-guest registry, removed and
pulled back, restores into another new pod the same way; a checkpoint given 1 s for a dump that
needs more is DeadlineExceeded with criu killed, nothing left and the container running.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import grpc

# This script's directory is first on sys.path: the e2e driver's helpers.
from guest_e2e import SOCKET, Checks, exec_out, finish, state_of, wait_for

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from tests.support.images import busybox_image, push_image
from tests.support.registry import running_registry

CHECKPOINT_DIR = Path("/var/lib/kubelet/checkpoints")  # pycri's default checkpoint_dir
# The token lives only in the shell's memory (a fresh start of the command would draw another),
# so the restored /count showing the original's token proves the memory came back.
COUNTER = (
    "echo persisted > /written; t=$RANDOM$RANDOM$RANDOM; i=0; "
    'while true; do i=$((i+1)); echo "$t $i" > /count; sleep 0.1; done'
)


# 128 MB held by a dd blocked writing to a reader that never reads, beside a counter.
BIG_COUNTER = (
    "dd if=/dev/zero bs=128M count=1 2>/dev/null | sleep 100000 & "
    'i=0; while true; do i=$((i+1)); echo "t $i" > /count; sleep 0.1; done'
)


def largest_rss_kb(cri: CRIClient, cid: str) -> int:
    out = exec_out(cri, cid, "sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null | grep VmRSS || true")
    return max((int(line.split()[1]) for line in out.splitlines() if line.split()[1:2]), default=0)


def criu_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "criu":
                    found.append(int(entry.name))
            except OSError:
                pass  # gone meanwhile
    return found


def token_count(cri: CRIClient, cid: str) -> tuple[str, int]:
    token, _, number = exec_out(cri, cid, "cat", "/count").strip().partition(" ")
    return token, int(number or 0)


def count(cri: CRIClient, cid: str) -> int:
    return token_count(cri, cid)[1]


def pycri_cli(*args: str) -> None:
    result = subprocess.run(["pycri", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pycri {' '.join(args)}: {result.stderr.strip()}"
    print(f"   pycri {args[0]}: {result.stdout.strip()}")


def crun_can_checkpoint() -> str:
    version = subprocess.run(["crun", "--version"], capture_output=True, text=True).stdout
    return "" if "+CRIU" in version else "crun here is built without CRIU (no +CRIU in crun --version)"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args()
    checks = Checks(args.summary)
    work = Path(tempfile.mkdtemp(prefix="pycri-vm-checkpoint-"))
    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    cri = CRIClient(SOCKET, timeout=120)

    def criu_works() -> None:
        report = subprocess.run(["pycri", "check"], capture_output=True, text=True).stdout
        lines = [line for line in report.splitlines() if "checkpoint" in line]
        print("   " + "\n   ".join(lines))
        assert any("CRIU works" in line for line in lines), lines

    if checks.run("criu check passes here and pycri check says so", criu_works) is None:
        return finish(checks)

    with running_registry(work / "registry") as reg:
        image = f"{reg.host}/vm/busybox-ckpt:1"
        if (
            checks.run(
                "push and pull busybox",
                lambda: (push_image(reg, "vm/busybox-ckpt", "1", busybox_image()), cri.pull(image)),
            )
            is None
        ):
            return finish(checks)
        pods: list[str] = []
        pulled: list[str] = []
        for runtime in ("runc", "crun"):
            why_not = crun_can_checkpoint() if runtime == "crun" else ""
            if why_not:
                checks.skip(f"[{runtime}] checkpoint and restore", why_not)
                continue
            archive = CHECKPOINT_DIR / f"counter-{runtime}.tar"
            state: dict[str, object] = {}

            def checkpoint(runtime: str = runtime, archive: Path = archive, state: dict = state) -> None:
                pod = cri.run_pod(
                    f"ckpt-{runtime}", runtime_handler=runtime, log_directory=str(work / "logs")
                )
                pods.append(pod)
                cid = cri.create_container(
                    pod, "counter", image, command=["sh", "-c", COUNTER], log_path="c.log"
                )
                cri.start_container(cid)
                wait_for(lambda: count(cri, cid) >= 20, 30, "the counter reaching 20")
                token, before = token_count(cri, cid)
                started = time.monotonic()
                cri.runtime.CheckpointContainer(
                    pb.CheckpointContainerRequest(container_id=cid, location=str(archive), timeout=120),
                    timeout=180,
                )
                print(
                    f"   checkpoint at count >= {before}: {time.monotonic() - started:.1f}s, "
                    f"{archive.stat().st_size} bytes"
                )
                with tarfile.open(archive) as tar:
                    names = tar.getnames()
                    diff = tar.extractfile("rootfs-diff.tar")
                    assert diff is not None
                    with tarfile.open(fileobj=diff) as inner:
                        changed = inner.getnames()
                print(
                    f"   members: {sorted(n for n in names if not n.startswith('checkpoint/'))}; "
                    f"{sum(n.startswith('checkpoint/') for n in names)} CRIU files; rootfs diff: {changed}"
                )
                for member in ("config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files", "checkpoint"):
                    assert member in names, f"{member} missing"
                assert "checkpoint/inventory.img" in names, "no CRIU inventory"
                assert "written" in changed and "count" in changed, changed
                # The original keeps running, still counting.
                assert state_of(cri, cid) == pb.ContainerState.CONTAINER_RUNNING
                later = count(cri, cid)
                time.sleep(0.5)
                assert count(cri, cid) > later, "the original stopped counting"
                state["before"], state["token"] = before, token

            if (
                checks.run(
                    f"[{runtime}] CheckpointContainer: archive with CRI-O's members, original running",
                    checkpoint,
                )
                is None
            ):
                continue

            def restore_into_new_pod(pod_name: str, image_ref: str, state: dict, runtime: str) -> None:
                """CreateContainer from ``image_ref`` (an archive or a checkpoint image) in a new
                pod, start it: the file is there and the counter goes on from the checkpoint."""
                pod = cri.run_pod(pod_name, runtime_handler=runtime, log_directory=str(work / "logs"))
                pods.append(pod)
                started = time.monotonic()
                cid = cri.create_container(pod, "restored", image_ref, log_path=f"{pod_name}.log")
                cri.start_container(cid)
                print(f"   create + start (restore): {time.monotonic() - started:.1f}s")
                assert state_of(cri, cid) == pb.ContainerState.CONTAINER_RUNNING
                written = exec_out(cri, cid, "cat", "/written").strip()
                token, first = token_count(cri, cid)
                time.sleep(1.0)
                second = count(cri, cid)
                print(
                    f"   restored: /written={written!r}; token {token} (the original's {state['token']}); "
                    f"count {first} -> {second} (checkpointed at >= {state['before']})"
                )
                assert written == "persisted", written
                assert token == state["token"], f"token {token} != {state['token']}: the command started anew"
                assert first >= int(str(state["before"])), "the counter started again: memory state lost"
                assert second > first, "the restored process is not running"

            checks.run(
                f"[{runtime}] restore into a new pod: the counter continues, the file is there",
                lambda runtime=runtime, archive=archive, state=state: restore_into_new_pod(
                    f"restored-{runtime}", str(archive), state, runtime
                ),
            )

            def restore_from_image(
                runtime: str = runtime, archive: Path = archive, state: dict = state
            ) -> None:
                # CRI-O's way through a registry: the archive as a checkpoint OCI image, pushed,
                # forgotten here and pulled back as another node would, restored from.
                ckpt_image = f"{reg.host}/vm/counter-ckpt-{runtime}:1"
                started = time.monotonic()
                pycri_cli("checkpoint-image", str(archive), ckpt_image)
                pycri_cli("push", ckpt_image)
                cri.remove_image(ckpt_image)
                cri.pull(ckpt_image)
                print(f"   checkpoint-image + push + pull: {time.monotonic() - started:.1f}s")
                pulled.append(ckpt_image)
                restore_into_new_pod(f"restored-image-{runtime}", ckpt_image, state, runtime)

            checks.run(
                f"[{runtime}] checkpoint OCI image (pycri checkpoint-image, push, pull) restores into a "
                "new pod: the counter continues",
                restore_from_image,
            )
            archive.unlink(missing_ok=True)

            def deadline(runtime: str = runtime) -> None:
                # A dump that cannot finish in time (a 1 s timeout; the dumps above take ~2 s, and
                # this one has 128 MB more to write) is killed, runtime and criu both: the call
                # is DeadlineExceeded, nothing is left, the container goes on running, not frozen.
                pod = cri.run_pod(
                    f"ckpt-deadline-{runtime}", runtime_handler=runtime, log_directory=str(work / "logs")
                )
                pods.append(pod)
                cid = cri.create_container(
                    pod, "big", image, command=["sh", "-c", BIG_COUNTER], log_path="big.log"
                )
                cri.start_container(cid)
                wait_for(lambda: largest_rss_kb(cri, cid) > 120_000, 120, "128 MB held in memory")
                wait_for(lambda: count(cri, cid) >= 5, 30, "the counter reaching 5")
                location = CHECKPOINT_DIR / f"deadline-{runtime}.tar"
                started = time.monotonic()
                try:
                    cri.runtime.CheckpointContainer(
                        pb.CheckpointContainerRequest(container_id=cid, location=str(location), timeout=1),
                        timeout=60,
                    )
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                else:
                    raise AssertionError("a 128 MB checkpoint finished within 1 s: nothing to test")
                elapsed = time.monotonic() - started
                print(f"   {code.name} after {elapsed:.1f}s: {details}")
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
                assert "did not finish" in details, details
                assert elapsed < 15, elapsed
                left = [p.name for p in CHECKPOINT_DIR.iterdir() if location.name in p.name]
                assert left == [], left
                assert criu_pids() == [], f"criu still running: {criu_pids()}"
                assert state_of(cri, cid) == pb.ContainerState.CONTAINER_RUNNING
                later = count(cri, cid)  # an exec into a frozen container would hang
                time.sleep(1.0)
                assert count(cri, cid) > later, "the container stopped counting: left frozen"

            checks.run(
                f"[{runtime}] CheckpointContainer past its timeout: DeadlineExceeded, criu killed, nothing "
                "left, the container running",
                deadline,
            )
        for each in pods:
            checks.run(
                f"StopPodSandbox + RemovePodSandbox {each[:12]}",
                lambda each=each: (cri.stop_pod(each), cri.remove_pod(each)),
            )
        for each_image in pulled:
            checks.run(
                f"RemoveImage {each_image}", lambda each_image=each_image: cri.remove_image(each_image)
            )
        checks.run("RemoveImage", lambda: cri.remove_image(image))
    cri.close()
    return finish(checks)


if __name__ == "__main__":
    sys.exit(main())
