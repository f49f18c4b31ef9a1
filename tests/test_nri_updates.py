"""NRI container and pod updates, evictions, validators and the whole lifecycle of a pod's
containers, against a real daemon with real containers; results read from the cgroup files.

The plugin is tests/support/nri_plugin.py; the daemon and its NRI socket are test_nri's fixture.
"""

from __future__ import annotations

import time

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.model import LinuxResources
from cri_runtime.nri import adjust
from cri_runtime.nri.api import api_pb2 as nri
from cri_runtime.nri.resources import from_nri, to_nri, unsupported
from cri_runtime.nri.ttrpc import TtrpcError
from tests import test_nri
from tests.support.host import cgroup_limits, cpu_value
from tests.support.nri_plugin import ALL_EVENTS, NriTestPlugin
from tests.support.pods import Env, container_cgroup, pod_cgroup, wait_exited
from tests.support.wait import wait_for

MiB = 1024 * 1024
nri_env = test_nri.nri_env  # the fixture: a daemon with NRI on its own socket
_socket = test_nri._socket


def _memory_limit(env: Env, pod: str, cid: str = "") -> int | None:
    """The memory limit the kernel enforces on the pod, or on its container ``cid`` (v1 or v2 files,
    either cgroup driver)."""
    path = container_cgroup(env.cri, pod, cid) if cid else pod_cgroup(env.cri, pod)
    return cgroup_limits(path).memory


def _cpu_shares(env: Env, pod: str, cid: str) -> int | None:
    """The container's CPU shares as the kernel holds them: v1's ``cpu.shares``, or on v2 the
    ``cpu.weight`` they became (compare with ``cpu_value(shares)``)."""
    return cgroup_limits(container_cgroup(env.cri, pod, cid)).cpu


def _memory_update(cid: str, limit: int, ignore_failure: bool = False) -> nri.ContainerUpdate:
    update = nri.ContainerUpdate(container_id=cid, ignore_failure=ignore_failure)
    update.linux.resources.memory.limit.value = limit
    return update


def _update_resources(env: Env, cid: str, **fields: int) -> None:
    env.cri.runtime.UpdateContainerResources(
        pb.UpdateContainerResourcesRequest(container_id=cid, linux=pb.LinuxContainerResources(**fields)),
        timeout=30,
    )


def test_update_container_plugin_changes_the_update_and_updates_another(nri_env: Env) -> None:
    pod = nri_env.pod("upd")
    other = nri_env.run(pod, "other", ["sleep", "100"])
    target = nri_env.run(pod, "target", ["sleep", "100"])

    def raise_limit(request: nri.UpdateContainerRequest) -> nri.UpdateContainerResponse:
        # The CRI asked for 64 MiB: the plugin makes it 96 MiB, and gives the other container 80.
        assert request.linux_resources.memory.limit.value == 64 * MiB
        return nri.UpdateContainerResponse(
            update=[_memory_update(request.container.id, 96 * MiB), _memory_update(other, 80 * MiB)]
        )

    plugin = NriTestPlugin(_socket(nri_env), "resizer", respond={"UpdateContainer": raise_limit}).start()
    try:
        _update_resources(nri_env, target, memory_limit_in_bytes=64 * MiB, cpu_shares=512)
        assert _memory_limit(nri_env, pod, target) == 96 * MiB
        # What the plugin left alone is applied as asked.
        assert _cpu_shares(nri_env, pod, target) == cpu_value(512)
        status = nri_env.cri.container_status(target).status
        assert status.resources.linux.memory_limit_in_bytes == 96 * MiB
        assert wait_for(lambda: _memory_limit(nri_env, pod, other) == 80 * MiB, timeout=10)
        assert ("UpdateContainer", "target") in plugin.events
        posts = [r for m, r in plugin.requests if m == "PostUpdateContainer"]
        assert [p.container.name for p in posts] == ["target"]
        assert posts[0].container.linux.resources.memory.limit.value == 96 * MiB
        assert plugin.events.index(("UpdateContainer", "target")) < plugin.events.index(
            ("PostUpdateContainer", "target")
        )
    finally:
        plugin.stop()


def test_update_container_conflicts_errors_and_impossible_values_apply_nothing(nri_env: Env) -> None:
    pod = nri_env.pod("updfail")
    cid = nri_env.run(pod, "c", ["sleep", "100"])
    _update_resources(nri_env, cid, memory_limit_in_bytes=64 * MiB, cpu_shares=512)

    def answer(limit: int):  # type: ignore[no-untyped-def]
        return lambda r: nri.UpdateContainerResponse(update=[_memory_update(r.container.id, limit)])

    first = NriTestPlugin(
        _socket(nri_env), "first", "10", respond={"UpdateContainer": answer(70 * MiB)}
    ).start()
    second = NriTestPlugin(
        _socket(nri_env), "second", "20", respond={"UpdateContainer": answer(90 * MiB)}
    ).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _update_resources(nri_env, cid, memory_limit_in_bytes=100 * MiB, cpu_shares=256)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "10-first and 20-second both adjust memory 'limit'" in err.value.details()
        assert _memory_limit(nri_env, pod, cid) == 64 * MiB
        assert _cpu_shares(nri_env, pod, cid) == cpu_value(512)
    finally:
        second.stop()
    try:
        # One plugin now; its 4 KiB limit is one no container can live with.
        first.respond["UpdateContainer"] = answer(4096)
        with pytest.raises(grpc.RpcError) as err:
            _update_resources(nri_env, cid, memory_limit_in_bytes=100 * MiB, cpu_shares=256)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "memory_limit_in_bytes 4096" in err.value.details()
        assert _memory_limit(nri_env, pod, cid) == 64 * MiB
        assert _cpu_shares(nri_env, pod, cid) == cpu_value(512)
        assert ("PostUpdateContainer", "c") not in first.events

        def refuse(request: nri.UpdateContainerRequest) -> nri.UpdateContainerResponse:
            raise TtrpcError(2, "no resize today")

        first.respond["UpdateContainer"] = refuse
        with pytest.raises(grpc.RpcError) as err:
            _update_resources(nri_env, cid, memory_limit_in_bytes=100 * MiB)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no resize today" in err.value.details()
        assert _memory_limit(nri_env, pod, cid) == 64 * MiB
    finally:
        first.stop()


def test_unsolicited_updates_and_evictions(nri_env: Env) -> None:
    pod = nri_env.pod("unsolicited")
    grown = nri_env.run(pod, "grown", ["sleep", "100"])
    kept = nri_env.run(pod, "kept", ["sleep", "100"])
    evicted = nri_env.run(pod, "evicted", ["sleep", "100"])
    _update_resources(nri_env, kept, memory_limit_in_bytes=64 * MiB)
    plugin = NriTestPlugin(_socket(nri_env), "unsolicited").start()
    try:
        bad_cpus = nri.ContainerUpdate(container_id=kept)
        bad_cpus.linux.resources.memory.limit.value = 32 * MiB
        bad_cpus.linux.resources.cpu.cpus = "4095"  # a CPU this host lacks: the whole update fails
        unknown = _memory_update("0" * 64, 64 * MiB)
        ignored = _memory_update("f" * 64, 64 * MiB, ignore_failure=True)
        answer = plugin.update_containers(
            [_memory_update(grown, 72 * MiB), bad_cpus, unknown, ignored],
            [nri.ContainerEviction(container_id=evicted, reason="make room")],
        )
        assert sorted(u.container_id for u in answer.failed) == sorted([kept, "0" * 64])
        assert _memory_limit(nri_env, pod, grown) == 72 * MiB
        assert _memory_limit(nri_env, pod, kept) == 64 * MiB  # nothing of the failed update
        assert wait_exited(nri_env.cri, evicted).state == pb.ContainerState.CONTAINER_EXITED
        assert nri_env.cri.container_status(grown).status.state == pb.ContainerState.CONTAINER_RUNNING
        assert wait_for(lambda: ("StopContainer", "evicted") in plugin.events, timeout=10)
        assert "make room" in nri_env.daemon.log_tail(300)
    finally:
        plugin.stop()


def test_create_and_stop_answers_update_and_evict_other_containers(nri_env: Env) -> None:
    pod = nri_env.pod("answers")
    neighbour = nri_env.run(pod, "neighbour", ["sleep", "100"])
    victim = nri_env.run(pod, "victim", ["sleep", "100"])

    def on_create(request: nri.CreateContainerRequest) -> nri.CreateContainerResponse:
        if request.container.name != "newcomer":
            return nri.CreateContainerResponse()
        return nri.CreateContainerResponse(
            update=[_memory_update(neighbour, 48 * MiB)],
            evict=[nri.ContainerEviction(container_id=victim, reason="newcomer needs it")],
        )

    def on_stop(request: nri.StopContainerRequest) -> nri.StopContainerResponse:
        if request.container.name != "newcomer":
            return nri.StopContainerResponse()
        return nri.StopContainerResponse(update=[_memory_update(neighbour, 112 * MiB)])

    plugin = NriTestPlugin(
        _socket(nri_env), "rebalancer", respond={"CreateContainer": on_create, "StopContainer": on_stop}
    ).start()
    try:
        newcomer = nri_env.run(pod, "newcomer", ["sleep", "100"])
        assert wait_for(lambda: _memory_limit(nri_env, pod, neighbour) == 48 * MiB, timeout=10)
        assert wait_exited(nri_env.cri, victim).state == pb.ContainerState.CONTAINER_EXITED
        assert nri_env.cri.container_status(newcomer).status.state == pb.ContainerState.CONTAINER_RUNNING
        nri_env.cri.stop_container(newcomer, 1)
        assert wait_for(lambda: _memory_limit(nri_env, pod, neighbour) == 112 * MiB, timeout=10)
    finally:
        plugin.stop()


def test_create_answer_updating_the_container_being_created_fails_it(nri_env: Env) -> None:
    pod = nri_env.pod("selfupdate")

    def on_create(request: nri.CreateContainerRequest) -> nri.CreateContainerResponse:
        return nri.CreateContainerResponse(update=[_memory_update(request.container.id, 64 * MiB)])

    plugin = NriTestPlugin(_socket(nri_env), "confused", respond={"CreateContainer": on_create}).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            nri_env.cri.create_container(pod, "self", nri_env.image, command=["sleep", "100"])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "during its creation" in err.value.details()
        assert nri_env.cri.list_containers() == []
        assert list((nri_env.daemon.state / "containers").iterdir()) == []
    finally:
        plugin.stop()


def test_pod_stop_and_removal_report_every_container(nri_env: Env) -> None:
    plugin = NriTestPlugin(_socket(nri_env), "watcher").start()
    try:
        pod = nri_env.pod("wholepod")
        nri_env.run(pod, "one", ["sleep", "100"])
        nri_env.run(pod, "two", ["sleep", "100"])
        nri_env.cri.stop_pod(pod)
        nri_env.cri.remove_pod(pod)
        events = plugin.events
        for name in ("one", "two"):
            assert events.index(("StopContainer", name)) < events.index(("StopPodSandbox", "wholepod"))
            assert events.count(("StopContainer", name)) == 1
            assert events.index(("StopPodSandbox", "wholepod")) < events.index(("RemoveContainer", name))
            assert events.index(("RemoveContainer", name)) < events.index(("RemovePodSandbox", "wholepod"))
            assert events.count(("RemoveContainer", name)) == 1
    finally:
        plugin.stop()


def test_update_pod_sandbox_events_and_a_refusal(nri_env: Env) -> None:
    config = nri_env.cri.pod_config("podresize", log_directory=str(nri_env.logs / "podresize"))
    config.linux.resources.memory_limit_in_bytes = 128 * MiB
    pod = nri_env.cri.run_pod("podresize", config=config)
    nri_env.pods.append(pod)
    # A pod with a container, as kubelet resizes them (and under the systemd driver the pod's
    # slice has its cgroup once a unit below it runs).
    nri_env.run(pod, "sleeper", ["sleep", "100"])
    assert _memory_limit(nri_env, pod) == 128 * MiB
    plugin = NriTestPlugin(_socket(nri_env), "podwatch").start()
    try:
        request = pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod)
        request.resources.memory_limit_in_bytes = 256 * MiB
        nri_env.cri.runtime.UpdatePodSandboxResources(request, timeout=30)
        assert _memory_limit(nri_env, pod) == 256 * MiB
        asked = [r for m, r in plugin.requests if m == "UpdatePodSandbox"]
        assert asked[0].linux_resources.memory.limit.value == 256 * MiB
        assert plugin.events[-2:] == [
            ("UpdatePodSandbox", "podresize"),
            ("PostUpdatePodSandbox", "podresize"),
        ]

        def refuse(request: nri.UpdatePodSandboxRequest) -> nri.UpdatePodSandboxResponse:
            raise TtrpcError(2, "pod stays as is")

        plugin.respond["UpdatePodSandbox"] = refuse
        request.resources.memory_limit_in_bytes = 512 * MiB
        with pytest.raises(grpc.RpcError) as err:
            nri_env.cri.runtime.UpdatePodSandboxResources(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "pod stays as is" in err.value.details()
        assert _memory_limit(nri_env, pod) == 256 * MiB
        assert plugin.events[-1] == ("UpdatePodSandbox", "podresize")
    finally:
        plugin.stop()


def test_validator_sees_the_final_adjustment_and_can_reject_it(nri_env: Env) -> None:
    adjuster = NriTestPlugin(
        _socket(nri_env),
        "adjuster",
        "10",
        adjust=nri.ContainerAdjustment(env=[nri.KeyValue(key="POLICY", value="loose")]),
    ).start()

    def judge(request: nri.ValidateContainerAdjustmentRequest) -> nri.ValidateContainerAdjustmentResponse:
        if any(kv.key == "POLICY" and kv.value == "loose" for kv in request.adjust.env):
            return nri.ValidateContainerAdjustmentResponse(reject=True, reason="loose policy is forbidden")
        return nri.ValidateContainerAdjustmentResponse()

    validator = NriTestPlugin(
        _socket(nri_env),
        "validator",
        "90",
        subscribe=ALL_EVENTS,
        respond={"ValidateContainerAdjustment": judge},
    ).start()
    try:
        pod = nri_env.pod("validated")
        with pytest.raises(grpc.RpcError) as err:
            nri_env.cri.create_container(pod, "loose", nri_env.image, command=["sleep", "100"])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "90-validator rejected the container adjustment: loose policy is forbidden" in err.value.details()
        )
        assert nri_env.cri.list_containers() == []
        assert list((nri_env.daemon.state / "containers").iterdir()) == []
        (asked,) = [r for m, r in validator.requests if m == "ValidateContainerAdjustment"]
        assert "POLICY=loose" not in asked.container.env  # the container as it was asked for
        owners = asked.owners.owners[asked.container.id]
        assert owners.compound[nri.Field.Value("Env")].owners["POLICY"] == "10-adjuster"
        assert {(p.name, p.index) for p in asked.plugins} >= {("adjuster", "10"), ("validator", "90")}
        # The adjuster changes its mind: the validator accepts, the container runs.
        adjuster.adjust = nri.ContainerAdjustment(env=[nri.KeyValue(key="POLICY", value="strict")])
        cid = nri_env.run(pod, "strict", ["sleep", "100"])
        assert nri_env.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_RUNNING
    finally:
        validator.stop()
        adjuster.stop()


def test_a_validator_that_does_not_answer_fails_create_and_is_dropped(nri_env: Env) -> None:
    def too_slow(request: nri.ValidateContainerAdjustmentRequest) -> nri.ValidateContainerAdjustmentResponse:
        time.sleep(2)  # blocks the plugin past the daemon's 1 s request timeout
        return nri.ValidateContainerAdjustmentResponse()

    validator = NriTestPlugin(
        _socket(nri_env), "slowjudge", subscribe=ALL_EVENTS, respond={"ValidateContainerAdjustment": too_slow}
    ).start()
    try:
        pod = nri_env.pod("slowjudge")
        with pytest.raises(grpc.RpcError) as err:
            nri_env.cri.create_container(pod, "judged", nri_env.image, command=["sleep", "100"])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "NRI validator 50-slowjudge failed" in err.value.details()
        assert nri_env.cri.list_containers() == []
        assert list((nri_env.daemon.state / "containers").iterdir()) == []
        assert wait_for(lambda: validator.closed, timeout=10)
        # Without the validator the same container is made.
        cid = nri_env.run(pod, "judged", ["sleep", "100"])
        assert nri_env.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_RUNNING
    finally:
        validator.stop()


def test_a_plugin_updates_existing_containers_in_its_synchronize_answer(nri_env: Env) -> None:
    pod = nri_env.pod("synced")
    cid = nri_env.run(pod, "existing", ["sleep", "100"])

    def on_sync(request: nri.SynchronizeRequest) -> nri.SynchronizeResponse:
        (existing,) = [c for c in request.containers if c.name == "existing"]
        return nri.SynchronizeResponse(update=[_memory_update(existing.id, 88 * MiB)])

    plugin = NriTestPlugin(_socket(nri_env), "syncer", respond={"Synchronize": on_sync}).start()
    try:
        assert wait_for(lambda: _memory_limit(nri_env, pod, cid) == 88 * MiB, timeout=10)
    finally:
        plugin.stop()


# --- the merge rules and conversions on their own (no daemon) ------------------------------------


def test_updates_merge_per_container_with_one_owner_per_field() -> None:
    requested = to_nri(LinuxResources(memory_limit_in_bytes=64 * MiB, cpu_shares=512))
    updates = adjust.Updates(target="t", requested=requested)
    updates.add([_memory_update("t", 96 * MiB), _memory_update("o", 10 * MiB)], "10-a")
    other_cpu = nri.ContainerUpdate(container_id="o")
    other_cpu.linux.resources.cpu.cpus = "0"
    updates.add([other_cpu], "20-b")  # another field of "o": no conflict
    with pytest.raises(FailedPrecondition, match="10-a and 20-b both adjust memory 'limit'"):
        updates.add([_memory_update("t", 128 * MiB)], "20-b")
    updates.add([_memory_update("o", 20 * MiB, ignore_failure=True)], "30-c")  # conflicts: dropped whole
    assert updates.requested.memory.limit.value == 96 * MiB
    merged = from_nri(updates.requested, LinuxResources(memory_limit_in_bytes=64 * MiB, cpu_shares=512))
    assert (merged.memory_limit_in_bytes, merged.cpu_shares) == (96 * MiB, 512)
    other = updates.others["o"].linux.resources
    assert (other.memory.limit.value, other.cpu.cpus) == (10 * MiB, "0")
    creating = adjust.Updates(target="new", creating=True)
    with pytest.raises(FailedPrecondition, match="during its creation"):
        creating.add([_memory_update("new", MiB)], "10-a")
    with pytest.raises(InvalidArgument, match="without a container id"):
        creating.add([_memory_update("", MiB)], "10-a")


def test_resources_round_trip_and_unsupported_fields() -> None:
    base = LinuxResources(
        cpu_period=100000,
        cpu_quota=50000,
        cpu_shares=256,
        memory_limit_in_bytes=64 * MiB,
        oom_score_adj=100,
        cpuset_cpus="0",
        unified={"memory.high": "max"},
    )
    assert from_nri(to_nri(base), base) == base
    update = nri.LinuxResources()
    update.memory.reservation.value = MiB
    update.pids.limit = 10
    update.cpu.quota.value = 20000
    assert unsupported(update) == ["memory.reservation", "pids"]
    assert from_nri(update, base).cpu_quota == 20000
    owners = adjust.Owners()
    owners.claim("env", "X", "10-a")
    owners.claim("memory", "limit", "10-a")
    owners.add_hooks("20-b")
    fields = owners.field_owners()
    assert fields.compound[nri.Field.Value("Env")].owners["X"] == "10-a"
    assert fields.simple[nri.Field.Value("MemLimit")] == "10-a"
    assert fields.simple[nri.Field.Value("OciHooks")] == "20-b"
