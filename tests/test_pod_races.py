"""Pod and container calls that race: a container is never made in a pod that is going away, and
none outlives its pod (the per-pod read/write lock of cri_runtime.runtime.pods)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from cri_runtime.daemon.client import CRIClient
from cri_runtime.host.mounts import mounts_under
from tests.support.daemon import Daemon, force_cleanup
from tests.support.images import Image, busybox_layer, push_image
from tests.support.registry import Registry

pytestmark = pytest.mark.root

ROUNDS = 30


@pytest.fixture(scope="module")
def race_image(registry: Registry) -> str:
    image = Image.build([busybox_layer()], cmd=["sh"], env=["PATH=/bin:/usr/bin"])
    push_image(registry, "test/races", "1", image)
    return f"{registry.host}/test/races:1"


def _processes_naming(workdir: Path, daemon_pid: int) -> list[str]:
    """Processes other than the daemon that name its directories: conmon, pod inits."""
    found = []
    needle = str(workdir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == daemon_pid:
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in argv or needle in environ:
            command = argv.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def race_create_and_remove(
    cri: CRIClient, pod: str, image: str, delay: float
) -> tuple[list[str], list[BaseException]]:
    """CreateContainer and RemovePodSandbox at once, the removal ``delay`` seconds late (the
    creation when negative), so that the removal lands before, during or after the creation's
    steps (mount, spec, conmon). The container IDs made, and what failed."""
    start = threading.Barrier(2)
    created: list[str] = []
    failures: list[BaseException] = []

    def create() -> None:
        start.wait()
        time.sleep(max(0.0, -delay))
        try:
            created.append(cri.create_container(pod, "app", image, command=["sleep", "1000"]))
        except grpc.RpcError as exc:
            # The pod went first: gone or no longer ready, nothing else.
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                failures.append(exc)
        except BaseException as exc:
            failures.append(exc)

    def remove() -> None:
        start.wait()
        time.sleep(max(0.0, delay))
        try:
            cri.remove_pod(pod)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=create), threading.Thread(target=remove)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return created, failures


def test_create_container_racing_remove_pod_never_leaves_a_container_without_its_pod(
    daemon_factory, race_image: str
) -> None:  # type: ignore[no-untyped-def]
    daemon: Daemon = daemon_factory('default_runtime = "runc"\n', name="races")
    assert daemon.process is not None
    rng = random.Random(12)
    outcomes: Counter[str] = Counter()
    pods: list[str] = []
    try:
        with daemon.client() as cri:
            cri.pull(race_image)
            for round_number in range(ROUNDS):
                pod = cri.run_pod(f"race-{round_number}", host_network=True, uid=f"uid-{round_number}")
                pods.append(pod)
                created, failures = race_create_and_remove(cri, pod, race_image, rng.uniform(-0.01, 0.05))
                assert not failures, failures
                outcomes["created, then removed with the pod" if created else "refused"] += 1

                assert pod not in {p.id for p in cri.list_pods()}
                orphans = [c.id for c in cri.list_containers() if c.pod_sandbox_id == pod]
                assert orphans == [], f"round {round_number}: containers outlived pod {pod}"
                for container_id in created:
                    with pytest.raises(grpc.RpcError) as gone:
                        cri.container_status(container_id)
                    assert gone.value.code() == grpc.StatusCode.NOT_FOUND

            # The two lists agree: nothing listed, nothing of either kind left.
            assert cri.list_pods() == []
            assert cri.list_containers() == []
        print(dict(outcomes))
        # Nothing leaked on the host.
        assert _processes_naming(daemon.workdir, daemon.process.pid) == []
        assert mounts_under(daemon.workdir) == []
        assert [p.name for p in (daemon.state / "containers").glob("*")] == []
        assert [p.name for p in (daemon.root / "containers").glob("*")] == []
        assert [p.name for p in (daemon.state / "sandboxes").glob("*")] == []
        assert [p.name for p in (daemon.state / "exec").glob("[0-9a-f]*")] == []
        assert [str(p) for pod in pods for p in Path("/sys/fs/cgroup").glob(f"*/pycri/{pod}")] == []
    finally:
        daemon.stop()
        force_cleanup(daemon)
