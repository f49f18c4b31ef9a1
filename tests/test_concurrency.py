"""No CRI call waits behind another call's waiting (issue #11).

Long waits (a stop's grace period, an exec's run time) are awaited on the daemon's event loop and
hold no worker thread: while many of them wait, other calls go through, and the daemon does not
need a thread per wait: more waits than the daemon has worker threads all end together, after
one grace period, not in rounds. A caller that goes away does not leave work half-done. The
timings asked of pycri against containerd are measured by ``make bench`` (``--only concurrency``);
these tests check the behaviour, by ordering, not by the clock.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.server import WORKER_THREADS
from tests.support.host import TIME_SCALE, ignores
from tests.support.pods import RUNTIMES, Env, container_pid, wait_exited
from tests.support.wait import wait_for

pytestmark = pytest.mark.parametrize("env", RUNTIMES, indirect=True)

STUBBORN = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]
GRACE = 12  # seconds each stubborn container is given: far longer than anything else here
# More waits than the daemon has worker threads: if each wait held one, they would end in rounds.
WAITERS = WORKER_THREADS + 8
# Long enough that all the execs start, and another call is served, before the first ends: a few
# seconds here, much longer under a VM's TCG, where they are 30 s.
EXEC_SECONDS = round(10 * min(TIME_SCALE, 3))


def stubborn_containers(env: Env, pod: str, count: int) -> list[str]:
    """Containers that ignore SIGTERM (checked in the kernel), so a stop waits its whole timeout."""
    ids = [env.run(pod, f"stubborn{i}", STUBBORN) for i in range(count)]
    for cid in ids:
        assert wait_for(lambda cid=cid: ignores(container_pid(env.cri, cid), signal.SIGTERM), timeout=20)
    return ids


def test_stops_waiting_out_their_grace_period_hold_no_thread_and_starve_no_pod(env: Env) -> None:
    pod = env.pod("graceful")
    victims = stubborn_containers(env, pod, WAITERS)
    returned: list[float] = []
    lock = threading.Lock()

    def stop(cid: str) -> None:
        env.cri.stop_container(cid, timeout=GRACE)
        with lock:
            returned.append(time.monotonic())

    started = time.monotonic()
    with ThreadPoolExecutor(len(victims)) as pool:
        stops = [pool.submit(stop, cid) for cid in victims]
        time.sleep(1)  # let the stops reach their wait; what follows is judged by order, not time
        # A new pod comes up, runs a container and answers an exec while all twelve wait.
        other = env.pod("meanwhile")
        cid = env.run(other, "quick", ["sleep", "300"])
        assert env.cri.exec_sync(cid, ["echo", "served"]).stdout == b"served\n"
        finished_meanwhile = time.monotonic()
        assert returned == [], "a stop returned before its grace period ended"
        for future in stops:
            future.result()
    # The pod start did not queue behind the stops: it finished while they were all still waiting.
    assert finished_meanwhile < min(returned)
    # Each stop honoured its timeout (then SIGKILL): none returned early, and none waited for a
    # thread that another stop's grace period held (that would end a second round, after 2 x GRACE).
    assert min(returned) - started >= GRACE - 0.5
    assert max(returned) - started < 2 * GRACE - 1
    for victim in victims:
        assert env.cri.container_status(victim).status.exit_code == 137


def count_in(env: Env, cid: str, command: str) -> int:
    """Processes in the container whose command line is exactly ``command``."""
    out = env.cri.exec_sync(cid, ["ps", "-o", "args"]).stdout.decode()
    return sum(1 for line in out.splitlines() if line.strip() == command)


def test_long_exec_syncs_hold_no_thread_and_starve_no_call(env: Env) -> None:
    pod = env.pod("execs")
    cid = env.run(pod, "host", ["sleep", "600"])
    other = env.run(env.pod("meanwhile"), "quick", ["sleep", "300"])
    started = time.monotonic()
    done: list[float] = []
    lock = threading.Lock()

    def long_exec() -> None:
        answer = env.cri.exec_sync(
            cid, ["sh", "-c", f"sleep {EXEC_SECONDS}; echo slept"], timeout=EXEC_SECONDS + 60
        )
        assert answer.stdout == b"slept\n" and answer.exit_code == 0
        with lock:
            done.append(time.monotonic())

    with ThreadPoolExecutor(WAITERS) as pool:
        execs = [pool.submit(long_exec) for _ in range(WAITERS)]
        # All of them running at once: none waits for a thread that another exec's run holds.
        assert wait_for(lambda: count_in(env, cid, f"sleep {EXEC_SECONDS}") == WAITERS, timeout=30)
        all_running = time.monotonic()
        # Another container's exec is served meanwhile, while all of them still wait.
        assert env.cri.exec_sync(other, ["echo", "served"]).stdout == b"served\n"
        assert env.cri.container_status(other).status.state == pb.ContainerState.CONTAINER_RUNNING
        served_at = time.monotonic()
        for future in execs:
            future.result()
    assert served_at < min(done)
    # And each answered when its own run ended: a whole EXEC_SECONDS after they all ran, at most
    # (the one started last), plus the time it takes to answer (seconds under a VM's TCG).
    assert max(done) - all_running < EXEC_SECONDS + 5 * TIME_SCALE
    assert min(done) - started >= EXEC_SECONDS


def test_a_stop_whose_caller_gives_up_still_finishes(env: Env) -> None:
    pod = env.pod("abandoned")
    (cid,) = stubborn_containers(env, pod, 1)
    pid = container_pid(env.cri, cid)
    with pytest.raises(grpc.RpcError) as err:
        env.cri.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=3), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The stop goes on without its caller: after the grace period, SIGKILL, and the exit is recorded.
    status = wait_exited(env.cri, cid, timeout=20)
    assert status.exit_code == 137
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    # Nothing is stuck: the container can be removed, its pod stopped.
    env.cri.remove_container(cid)
    env.cri.stop_pod(pod)


def test_an_exec_whose_caller_gives_up_is_killed(env: Env) -> None:
    pod = env.pod("abandonedexec")
    cid = env.run(pod, "host", ["sleep", "600"])
    with pytest.raises(grpc.RpcError) as err:
        env.cri.runtime.ExecSync(
            pb.ExecSyncRequest(container_id=cid, cmd=["sleep", "4242"], timeout=0), timeout=1.0
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    assert wait_for(lambda: count_in(env, cid, "sleep 4242") == 0, timeout=10)
