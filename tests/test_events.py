"""GetContainerEvents: the lifecycle stream kubelet's evented PLEG reads."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from cri_runtime.errors import ResourceExhausted
from cri_runtime.runtime.events import EventHub
from cri_runtime.runtime.state import Container
from tests.support.host import TIME_SCALE
from tests.support.pods import Env, wait_exited
from tests.support.wait import wait_for

E = pb.ContainerEventType


class Watcher:
    """One GetContainerEvents stream read by a thread into a queue. A watcher made with
    ``read=False`` reads only its first event (to show its stream is open), then nothing."""

    def __init__(self, endpoint: str, read: bool = True) -> None:
        self.client = CRIClient(endpoint)
        self.stream = self.client.runtime.GetContainerEvents(pb.GetEventsRequest())
        self.events: queue.Queue[pb.ContainerEventResponse | grpc.RpcError] = queue.Queue()
        self.seen: set[str] = set()  # container IDs it had events of
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, args=(read,), daemon=True).start()

    def _read(self, keep_reading: bool) -> None:
        try:
            for event in self.stream:
                self.events.put(event)
                with self.arrived:
                    self.seen.add(event.container_id)
                    self.arrived.notify_all()
                if not keep_reading:
                    return
        except grpc.RpcError as exc:
            self.events.put(exc)

    def sees_one_of(self, ids: list[str], timeout: float) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: not self.seen.isdisjoint(ids), timeout)

    def take(self, cid: str, count: int, timeout: float = 15) -> list[pb.ContainerEventResponse]:
        found: list[pb.ContainerEventResponse] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            item = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            assert not isinstance(item, grpc.RpcError), item
            if item.container_id == cid:
                found.append(item)
        return found

    def close(self) -> None:
        self.stream.cancel()
        self.client.close()


@pytest.fixture
def watchers(env: Env) -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for watcher in made:
        watcher.close()


def wait_until_open(env: Env, watchers: list[Watcher]) -> set[str]:
    """Wait until every watcher's stream is open on the server: the events of a probe container,
    created and removed in a pod of its own, reach them all. A stream that opened after a probe
    cannot see it, so each try makes a new one. Returns the probes' IDs, whose events the streams
    also hold."""
    pod = env.pod("probes")
    probes: list[str] = []

    def all_open() -> bool:
        probe = env.cri.create_container(
            pod, f"probe{len(probes)}", env.image, command=["true"], log_path=f"probe{len(probes)}.log"
        )
        probes.append(probe)
        env.cri.remove_container(probe)
        return all(watcher.sees_one_of(probes, timeout=2) for watcher in watchers)

    assert wait_for(all_open, timeout=60, interval=0)
    return set(probes)


def test_two_watchers_see_created_started_stopped_deleted_in_order(env: Env, watchers: list[Watcher]) -> None:
    for _ in range(2):
        watchers.append(Watcher(env.daemon.endpoint))
    wait_until_open(env, watchers)
    pod = env.pod("evented")
    sibling = env.run(pod, "sibling", ["sleep", "100"])
    cid = env.run(pod, "quick", ["sh", "-c", "exit 5"])
    wait_exited(env.cri, cid)
    env.cri.remove_container(cid)
    for watcher in watchers:
        events = watcher.take(cid, 4)
        assert [e.container_event_type for e in events] == [
            E.CONTAINER_CREATED_EVENT,
            E.CONTAINER_STARTED_EVENT,
            E.CONTAINER_STOPPED_EVENT,
            E.CONTAINER_DELETED_EVENT,
        ]
        times = [e.created_at for e in events]
        assert times == sorted(times) and times[0] > 0
        for event in events:
            assert event.pod_sandbox_status.id == pod
            assert event.pod_sandbox_status.state == pb.PodSandboxState.SANDBOX_READY
            assert event.pod_sandbox_status.network.ip.startswith(env.subnet_prefix)
        created, started, stopped, deleted = ({s.id: s for s in e.containers_statuses} for e in events)
        assert created[cid].state == pb.ContainerState.CONTAINER_CREATED
        assert started[cid].state == pb.ContainerState.CONTAINER_RUNNING
        assert stopped[cid].state == pb.ContainerState.CONTAINER_EXITED
        assert stopped[cid].exit_code == 5
        assert cid not in deleted and deleted[sibling].state == pb.ContainerState.CONTAINER_RUNNING


def test_a_watcher_that_never_reads_does_not_slow_the_runtime(env: Env, watchers: list[Watcher]) -> None:
    stuck = Watcher(env.daemon.endpoint, read=False)
    watchers.append(stuck)
    reader = Watcher(env.daemon.endpoint)
    watchers.append(reader)
    probes = wait_until_open(env, watchers)
    pod = env.pod("busy")
    started = time.monotonic()
    ids = []
    for i in range(15):
        cid = env.run(pod, f"c{i}", ["true"])
        ids.append(cid)
        wait_exited(env.cri, cid)
        env.cri.remove_container(cid)
    elapsed = time.monotonic() - started
    for cid in ids:
        assert len(reader.take(cid, 4)) == 4
    # 15 create/start/remove rounds: seconds, not the stream's timeouts.
    assert elapsed < 30 * TIME_SCALE, elapsed
    # The stuck watcher's stream is still there to be read, in order (after the probes' events).
    first = next(event for event in stuck.stream if event.container_id not in probes)
    assert first.container_id == ids[0] and first.container_event_type == E.CONTAINER_CREATED_EVENT


def test_pod_sandbox_status_carries_the_containers_and_a_timestamp(env: Env) -> None:
    pod = env.pod("status")
    cid = env.run(pod, "c", ["sleep", "100"])
    before = time.time_ns()
    response = env.cri.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod))
    assert response.timestamp >= before
    assert [s.id for s in response.containers_statuses] == [cid]
    assert response.containers_statuses[0].state == pb.ContainerState.CONTAINER_RUNNING


def _container(cid: str) -> Container:
    return Container(
        id=cid,
        pod_id="p",
        name="n",
        attempt=0,
        labels={},
        annotations={},
        image="i",
        image_id="sha256:x",
        image_ref="sha256:x",
        created_at_ns=1,
        config=b"",
        log_path="",
        runtime="runc",
    )


def test_a_watcher_that_falls_behind_is_cut_off_and_others_are_not() -> None:
    async def scenario() -> tuple[list[str], str, int]:
        hub = EventHub(limit=5)
        loop = asyncio.get_running_loop()
        slow, fast = hub.subscribe(loop), hub.subscribe(loop)
        got: list[str] = []

        async def drain() -> None:
            while len(got) < 20:
                got.append((await fast.next()).container.id)

        reader = asyncio.create_task(drain())
        for i in range(20):
            # Published from another thread, as the managers do.
            await asyncio.to_thread(hub.publish, "created", _container(f"c{i}"))
            await asyncio.sleep(0)
        await reader
        seen = 0
        try:
            while True:
                await slow.next()
                seen += 1
        except ResourceExhausted as exc:
            message = str(exc)
        hub.unsubscribe(slow)
        hub.unsubscribe(fast)
        assert hub.watchers() == 0
        return got, message, seen

    got, message, seen = asyncio.run(scenario())
    assert got == [f"c{i}" for i in range(20)]
    assert seen == 5
    assert "reconnect and relist" in message
