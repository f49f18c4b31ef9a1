"""The cgroup drivers: names and paths (pure), driver choice and refusal, and pycri check's verdict.

The systemd driver's D-Bus work needs a host booted with systemd: those tests are skipped here
(this host has none) and run in the VM guest (vm/guest_e2e.py runs the CRI checks under both
drivers; `make vm-test`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cri_runtime.daemon import check
from cri_runtime.daemon.config import Config, config_from_dict
from cri_runtime.daemon.server import make_cgroup_driver
from cri_runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from cri_runtime.host import cgroups, systemd

POD = "0123456789abcdef" * 4
CTR = "fedcba9876543210" * 4


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("kubepods.slice", "/kubepods.slice"),
        ("kubepods-burstable.slice", "/kubepods.slice/kubepods-burstable.slice"),
        (
            "kubepods-burstable-pod1234_5678.slice",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice",
        ),
        ("a-b-c-d.slice", "/a.slice/a-b.slice/a-b-c.slice/a-b-c-d.slice"),
        ("-.slice", "/"),
    ],
)
def test_a_slice_name_expands_to_the_place_systemd_gives_it(name: str, path: str) -> None:
    assert systemd.slice_path(name) == path


@pytest.mark.parametrize(
    "name",
    [
        "kubepods",  # not a slice
        "/kubepods/burstable/pod1",  # a cgroupfs path
        "kubepods--burstable.slice",  # an empty level
        "-kubepods.slice",
        "kubepods-.slice",
        "kube pods.slice",
        "kubepods/x.slice",
        "a" * 250 + ".slice",
    ],
)
def test_what_is_not_a_slice_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        systemd.slice_path(name)


def test_a_slice_s_parent_is_its_name_less_the_last_level() -> None:
    assert systemd.parent_slice("kubepods-burstable-pod1.slice") == "kubepods-burstable.slice"
    assert systemd.parent_slice("kubepods.slice") == "-.slice"


def test_container_cgroups_paths_take_the_form_each_runtime_manager_reads() -> None:
    # crun and runc under --systemd-cgroup: "slice:prefix:name" -> scope prefix-name.scope in slice.
    driver = systemd.SystemdDriver(systemd.SystemdBus("unix:path=/nonexistent"))
    pod = systemd.slice_path("kubepods-besteffort-podabc.slice")
    assert driver.container_cgroups_path(pod, CTR) == f"kubepods-besteffort-podabc.slice:pycri:{CTR}"
    assert cgroups.container_path(pod, CTR) == f"{pod}/pycri-{CTR}.scope"
    assert systemd.container_scope(CTR) == f"pycri-{CTR}.scope"
    assert systemd.conmon_scope(CTR) == f"pycri-conmon-{CTR}.scope"
    # cgroupfs: the runtime makes the container's directory below the pod's.
    assert cgroups.CgroupfsDriver().container_cgroups_path("/kubepods/pod1", CTR) == f"/kubepods/pod1/{CTR}"
    assert cgroups.container_path("/kubepods/pod1/", CTR) == f"/kubepods/pod1/{CTR}"


def test_the_systemd_driver_places_pods_by_slice_name_and_refuses_cgroupfs_paths() -> None:
    driver = systemd.SystemdDriver(systemd.SystemdBus("unix:path=/nonexistent"))
    assert driver.pod_cgroup(POD, "kubepods-pod1.slice") == "/kubepods.slice/kubepods-pod1.slice"
    # No parent (crictl): a slice of pycri's own, one per pod.
    assert driver.pod_cgroup(POD, "") == f"/pycri.slice/pycri-pod{POD}.slice"
    with pytest.raises(InvalidArgument, match="cgroupfs path, but pycri's cgroup_driver is systemd"):
        driver.pod_cgroup(POD, "/kubepods/burstable/pod1")
    with pytest.raises(InvalidArgument, match="not a systemd slice name"):
        driver.pod_cgroup(POD, "kubepods")
    for own in ("system.slice", "-.slice", "user.slice"):
        with pytest.raises(InvalidArgument, match="systemd's own slice"):
            driver.pod_cgroup(POD, own)
    assert driver.runtime_args == ("--systemd-cgroup",)
    assert driver.conmon_cgroup("/kubepods.slice/kubepods-pod1.slice") == "kubepods-pod1.slice"


def test_the_cgroupfs_driver_refuses_a_slice_as_kubelet_sends_under_the_systemd_driver() -> None:
    driver = cgroups.CgroupfsDriver("/pycri")
    assert driver.pod_cgroup(POD, "") == f"/pycri/{POD}"
    assert driver.pod_cgroup(POD, "/kubepods//burstable/pod1/") == "/kubepods/burstable/pod1"
    with pytest.raises(InvalidArgument, match="is a systemd slice, but pycri's cgroup_driver is cgroupfs"):
        driver.pod_cgroup(POD, "kubepods-burstable-pod1.slice")
    with pytest.raises(InvalidArgument, match="climbs out"):
        driver.pod_cgroup(POD, "/kubepods/../../x")
    assert driver.runtime_args == () and driver.conmon_cgroup("/kubepods/pod1") is None


@pytest.mark.parametrize(("shares", "weight"), [(2, 1), (1024, 39), (262144, 10000), (1, 1), (10**6, 10000)])
def test_cpu_shares_become_the_weight_the_kernel_and_systemd_compute(shares: int, weight: int) -> None:
    assert cgroups.shares_to_weight(shares) == weight


def test_the_configuration_takes_either_driver_and_nothing_else() -> None:
    assert config_from_dict({"cgroup_driver": "systemd"}).cgroup_driver == "systemd"
    with pytest.raises(InvalidArgument, match="cgroup_driver must be cgroupfs or systemd"):
        config_from_dict({"cgroup_driver": "cgroupv2"})


def test_d_bus_that_is_not_there_is_unavailable_at_once() -> None:
    bus = systemd.SystemdBus("unix:path=/nonexistent/system_bus_socket", timeout=5)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="systemd is not reachable over D-Bus"):
            bus.version()
    finally:
        bus.close()
    assert time.monotonic() - started < 5


@pytest.mark.skipif(systemd.systemd_running(), reason="this host runs systemd")
def test_serve_refuses_the_systemd_driver_without_systemd_saying_what_to_do() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        make_cgroup_driver(Config(cgroup_driver="systemd"))
    assert 'set cgroup_driver = "cgroupfs"' in str(caught.value)
    assert "systemd is not running here" in str(caught.value)


def _host(tmp_path: Path, *, booted: bool, kubelet: str | None = None) -> check.Host:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    if booted:
        (root / "run/systemd/system").mkdir(parents=True)
    cgroup_root = tmp_path / "cgroup"
    cgroup_root.mkdir()
    (cgroup_root / "cgroup.controllers").write_text("cpu memory pids io\n")
    kubelet_config = tmp_path / "kubelet.yaml"
    if kubelet:
        kubelet_config.write_text(f"kind: KubeletConfiguration\ncgroupDriver: {kubelet}\n")
    return check.Host(proc=Path("/proc"), cgroup_root=cgroup_root, root=root, kubelet_config=kubelet_config)


def test_check_fails_the_systemd_driver_without_systemd_and_says_what_to_do(tmp_path: Path) -> None:
    findings = check.check_config(Config(cgroup_driver="systemd"), _host(tmp_path, booted=False))
    assert [f.level for f in findings] == [check.FAIL]
    assert "systemd is not running here" in findings[0].what and "cgroup v2" in findings[0].what
    assert 'cgroup_driver = "cgroupfs"' in findings[0].fix
    assert check.exit_code(findings) == 1


def test_check_fails_the_systemd_driver_when_systemd_does_not_answer(tmp_path: Path) -> None:
    bus = systemd.SystemdBus("unix:path=/nonexistent/system_bus_socket", timeout=5)
    findings = check.check_config(Config(cgroup_driver="systemd"), _host(tmp_path, booted=True), bus)
    assert [f.level for f in findings] == [check.FAIL]
    assert "not reachable over D-Bus" in findings[0].what and "apt-get install dbus" in findings[0].fix


def test_check_names_the_cgroup_version_and_driver(tmp_path: Path) -> None:
    (finding,) = check.check_config(Config(), _host(tmp_path, booted=False))
    assert finding.level == check.OK
    assert finding.what.startswith("cgroup v2, driver cgroupfs; systemd is not running")


def test_check_fails_when_kubelet_uses_the_other_driver(tmp_path: Path) -> None:
    findings = check.check_config(Config(), _host(tmp_path, booted=False, kubelet="systemd"))
    assert [f.level for f in findings] == [check.OK, check.FAIL]
    assert "kubelet's cgroupDriver is systemd" in findings[1].what
    assert 'cgroup_driver = "systemd"' in findings[1].fix
    same = check.check_config(Config(), _host(tmp_path / "b", booted=False, kubelet="cgroupfs"))
    assert [f.level for f in same] == [check.OK]


@pytest.mark.skipif(
    not systemd.systemd_running(), reason="needs a host booted with systemd (runs in the VM guest)"
)
def test_a_pod_slice_made_through_d_bus_is_where_systemd_says_and_goes_away(tmp_path: Path) -> None:
    driver = systemd.SystemdDriver()
    try:
        pod = driver.pod_cgroup(POD, f"pycritest-pod{POD[:12]}.slice")
        assert driver.pod_missing(pod) == [f"pycritest-pod{POD[:12]}.slice"]
        created = driver.create_pod(pod, "pycri test pod")
        try:
            assert (cgroups.CGROUP_ROOT / pod.lstrip("/")).is_dir()
            driver.apply_pod_limits(pod, memory=128 << 20, cpu_quota=50_000, cpu_period=100_000)
            assert (cgroups.CGROUP_ROOT / pod.lstrip("/") / "memory.max").read_text().strip() == str(
                128 << 20
            )
            assert (cgroups.CGROUP_ROOT / pod.lstrip("/") / "cpu.max").read_text().strip() == "50000 100000"
            with pytest.raises(FailedPrecondition, match="exists already"):
                driver.bus.start_transient(created[0], [])
        finally:
            driver.remove_pod(pod, created)
        assert not (cgroups.CGROUP_ROOT / pod.lstrip("/")).exists()
        assert driver.bus.active_state(created[0]) is None
    finally:
        driver.close()


def test_pids_limit_is_a_count_of_zero_or_more() -> None:
    assert config_from_dict({"pids_limit": 2048}).pids_limit == 2048
    with pytest.raises(InvalidArgument, match="pids_limit must be 0"):
        config_from_dict({"pids_limit": -1})
    with pytest.raises(InvalidArgument, match="pids_limit"):
        config_from_dict({"pids_limit": "1024"})


def test_a_v2_memory_limit_below_what_a_cgroup_cannot_give_back_is_refused(tmp_path: Path) -> None:
    """cgroup v2 takes such a memory.max and OOM-kills the cgroup's processes to meet it (v1
    refuses it with EBUSY): pycri asks first. File cache counts as reclaimable, tmpfs does not."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    pod = tmp_path / "pycri" / "pod"
    pod.mkdir(parents=True)
    mib = 1024 * 1024
    (pod / "memory.current").write_text(f"{90 * mib}\n")
    # 70 MiB of file pages, of which 40 MiB tmpfs/shm: 60 MiB held that reclaim cannot free.
    (pod / "memory.stat").write_text(f"anon {20 * mib}\nfile {70 * mib}\nshmem {40 * mib}\n")
    assert cgroups.memory_held("/pycri/pod", tmp_path) == 60 * mib
    cgroups.check_memory_fits("/pycri/pod", 64 * mib, "pod cgroup /pycri/pod", tmp_path)
    with pytest.raises(
        FailedPrecondition, match=r"memory.max = 33554432 on pod cgroup /pycri/pod.*62914560 bytes"
    ):
        cgroups.check_memory_fits("/pycri/pod", 32 * mib, "pod cgroup /pycri/pod", tmp_path)
    # Not known (a cgroup that is gone; a v1 host, where the kernel refuses it itself): no refusal.
    assert cgroups.memory_held("/pycri/gone", tmp_path) is None
    cgroups.check_memory_fits("/pycri/gone", mib, "x", tmp_path)
    (tmp_path / "cgroup.controllers").unlink()
    assert cgroups.memory_held("/pycri/pod", tmp_path) is None
