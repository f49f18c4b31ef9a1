"""AppArmor and SELinux: pycri's default profile, profile names, the spec's labels, and on this
host (no AppArmor, no SELinux) what a pod that asks for confinement gets. The guest of the VM tests,
which has AppArmor, checks the enforcement itself (vm/guest_apparmor.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon import check
from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.host import apparmor as host_apparmor
from cri_runtime.host import selinux as host_selinux
from cri_runtime.host.mounts import mounts_under
from cri_runtime.model import ContainerSecurity, SecurityProfile, SELinuxOptions
from cri_runtime.oci import apparmor, selinux, spec
from tests.support.pods import Env, exec_out, wait_exited
from tests.test_spec import build, make_config, make_sandbox, rootfs  # noqa: F401  (fixture)

HOST_HAS_APPARMOR = host_apparmor.enabled()


# --- the default profile ---------------------------------------------------------------------


def test_default_profile_denies_what_containerd_and_crio_deny() -> None:
    text = host_apparmor.default_profile_text(abi_3=False)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "profile pycri-default flags=(attach_disconnected,mediate_deleted) {"
    assert lines[-1] == "}"
    rules = lines[1:-1]
    assert all(rule.endswith(",") for rule in rules), rules
    for rule in (
        "deny mount,",
        "deny /proc/sysrq-trigger rwklx,",
        "deny /proc/kcore rwklx,",
        "deny /proc/* w,",
        "deny /proc/sys/[^k]** w,",
        "deny /sys/kernel/security/** rwklx,",
        "deny /sys/firmware/** rwklx,",
        "signal (send,receive) peer=pycri-default,",
        "signal (receive) peer=unconfined,",
        "ptrace (trace,read,tracedby,readby) peer=pycri-default,",
        "file,",
        "network,",
        "capability,",
    ):
        assert rule in rules, rule
    # No ptrace or signal rule reaches a peer outside the profile, but for receiving signals.
    for rule in rules:
        if rule.startswith("ptrace") or rule.startswith("signal (send"):
            assert rule.endswith("peer=pycri-default,"), rule
    assert "abi <abi/3.0>," not in text
    assert host_apparmor.default_profile_text(abi_3=True).startswith("abi <abi/3.0>,\n")


def test_loaded_profiles_are_read_from_the_kernels_listing(tmp_path: Path) -> None:
    listing = tmp_path / "profiles"
    listing.write_text(
        "pycri-default (enforce)\n/usr/sbin/ntpd (complain)\n"
        "odd (name) here (enforce)\nlsb_release (enforce)\n"
    )
    profiles = host_apparmor.loaded_profiles(listing)
    assert profiles == {
        "pycri-default": "enforce",
        "/usr/sbin/ntpd": "complain",
        "odd (name) here": "enforce",
        "lsb_release": "enforce",
    }
    assert host_apparmor.is_loaded("pycri-default", listing)
    assert not host_apparmor.is_loaded("pycri", listing)
    assert host_apparmor.loaded_profiles(tmp_path / "absent") == {}


def test_enabled_follows_the_kernels_switch(tmp_path: Path) -> None:
    switch = tmp_path / "enabled"
    switch.write_text("Y\n")
    assert host_apparmor.enabled(switch)
    switch.write_text("N\n")
    assert not host_apparmor.enabled(switch)
    assert not host_apparmor.enabled(tmp_path / "absent")


# --- names and the deprecated field ------------------------------------------------------------


@pytest.mark.parametrize("ref", ["k8s-deny-write", "localhost/k8s-deny-write", "a.b_c:d@e+f=g~h", "x"])
def test_localhost_names_that_are_profile_names_are_accepted(ref: str) -> None:
    assert apparmor.localhost_name(ref, "f") == ref.removeprefix("localhost/")


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "localhost/",
        "a/b",
        "localhost/a//hat",
        "/usr/bin/x",
        "two words",
        "tab\tname",
        "new\nline",
        "x" * 256,
    ],
)
def test_malformed_or_escaping_names_are_invalid(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="f"):
        apparmor.localhost_name(ref, "f")


@pytest.mark.parametrize(
    ("legacy", "expected"),
    [
        ("", None),
        ("runtime/default", SecurityProfile("runtime_default")),
        ("unconfined", SecurityProfile("unconfined")),
        ("localhost/mine", SecurityProfile("localhost", "localhost/mine")),
    ],
)
def test_the_deprecated_string_field_is_read(legacy: str, expected: SecurityProfile | None) -> None:
    assert apparmor.requested_profile(ContainerSecurity(apparmor_profile=legacy)) == expected


def test_the_profile_field_wins_over_the_deprecated_string() -> None:
    security = ContainerSecurity(apparmor=SecurityProfile("unconfined"), apparmor_profile="localhost/x")
    assert apparmor.requested_profile(security) == SecurityProfile("unconfined")


def test_an_unknown_deprecated_string_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="docker/default"):
        apparmor.requested_profile(ContainerSecurity(apparmor_profile="docker/default"))


# --- the spec ----------------------------------------------------------------------------------


def security_config(
    kind: int | None = None, ref: str = "", legacy: str = "", privileged: bool = False
) -> pb.ContainerConfig:
    config = make_config()
    security = config.linux.security_context
    if kind is not None:
        security.apparmor.profile_type = kind  # type: ignore[assignment]
        security.apparmor.localhost_ref = ref
    security.apparmor_profile = legacy
    security.privileged = privileged
    return config


@pytest.mark.parametrize(
    ("kind", "legacy", "privileged", "expected"),
    [
        (None, "", False, "pycri-default"),  # nothing asked: the runtime's default
        (pb.SecurityProfile.RuntimeDefault, "", False, "pycri-default"),
        (None, "runtime/default", False, "pycri-default"),
        (pb.SecurityProfile.Unconfined, "", False, None),
        (None, "unconfined", False, None),
        (None, "", True, None),  # privileged: unconfined
        (pb.SecurityProfile.RuntimeDefault, "", True, None),
    ],
)
def test_spec_profile_where_apparmor_is_enabled(
    rootfs: Path,  # noqa: F811
    kind: int | None,
    legacy: str,
    privileged: bool,
    expected: str | None,
) -> None:
    sandbox = make_sandbox(privileged=privileged)
    config = security_config(kind, legacy=legacy, privileged=privileged)
    oci = build(rootfs, config, sandbox=sandbox, apparmor_enabled=True, selinux_enabled=False)
    assert oci["process"].get("apparmorProfile") == expected


def test_spec_refuses_a_localhost_profile_the_kernel_has_not_loaded(rootfs: Path) -> None:  # noqa: F811
    config = security_config(pb.SecurityProfile.Localhost, "pycri-test-never-loaded")
    # Enabled, but the kernel's listing (absent on this host) does not hold the profile.
    with pytest.raises(FailedPrecondition, match="'pycri-test-never-loaded' is not loaded"):
        build(rootfs, config, apparmor_enabled=True, selinux_enabled=False)
    # A privileged container gets the Localhost profile it names (it was asked for by name).
    privileged = security_config(pb.SecurityProfile.Localhost, "pycri-test-never-loaded", privileged=True)
    with pytest.raises(FailedPrecondition, match="not loaded"):
        build(
            rootfs,
            privileged,
            sandbox=make_sandbox(privileged=True),
            apparmor_enabled=True,
            selinux_enabled=False,
        )
    legacy = security_config(legacy="localhost/pycri-test-never-loaded")
    with pytest.raises(FailedPrecondition, match=r"apparmor_profile: .*not loaded"):
        build(rootfs, legacy, apparmor_enabled=True, selinux_enabled=False)


def test_spec_refuses_a_localhost_profile_where_apparmor_is_off(rootfs: Path) -> None:  # noqa: F811
    config = security_config(pb.SecurityProfile.Localhost, "localhost/mine")
    with pytest.raises(FailedPrecondition, match=r"'mine'.*AppArmor is not enabled on this host"):
        build(rootfs, config, apparmor_enabled=False, selinux_enabled=False)
    # RuntimeDefault and Unconfined are no-ops there.
    for kind in (pb.SecurityProfile.RuntimeDefault, pb.SecurityProfile.Unconfined):
        oci = build(rootfs, security_config(kind), apparmor_enabled=False, selinux_enabled=False)
        assert "apparmorProfile" not in oci["process"]


@pytest.mark.parametrize("enabled", [True, False])
def test_spec_refuses_malformed_names_whether_or_not_apparmor_is_on(rootfs: Path, enabled: bool) -> None:  # noqa: F811
    for config in (
        security_config(pb.SecurityProfile.Localhost, "../etc/x"),
        security_config(pb.SecurityProfile.Localhost, ""),
        security_config(legacy="localhost/with space"),
        security_config(legacy="bogus"),
    ):
        with pytest.raises(InvalidArgument):
            build(rootfs, config, apparmor_enabled=enabled, selinux_enabled=False)


# --- SELinux -------------------------------------------------------------------------------


def selinux_config(**options: str) -> pb.ContainerConfig:
    config = make_config()
    if options:
        config.linux.security_context.selinux_options.CopyFrom(pb.SELinuxOption(**options))
    return config


def test_spec_labels_where_selinux_is_enabled(rootfs: Path) -> None:  # noqa: F811
    sandbox = make_sandbox(selinux_options=SELinuxOptions(level="s0:c1,c2"))
    oci = build(
        rootfs, selinux_config(type="spc_t"), sandbox=sandbox, apparmor_enabled=False, selinux_enabled=True
    )
    assert oci["process"]["selinuxLabel"] == "system_u:system_r:spc_t:s0:c1,c2"
    assert oci["linux"]["mountLabel"] == "system_u:object_r:container_file_t:s0:c1,c2"
    # The container's own level and user win; the role and type stay out of the mount label.
    oci = build(
        rootfs,
        selinux_config(user="user_u", role="user_r", level="s0:c7,c9"),
        sandbox=sandbox,
        apparmor_enabled=False,
        selinux_enabled=True,
    )
    assert oci["process"]["selinuxLabel"] == "user_u:user_r:container_t:s0:c7,c9"
    assert oci["linux"]["mountLabel"] == "user_u:object_r:container_file_t:s0:c7,c9"


def test_privileged_containers_are_not_labelled(rootfs: Path) -> None:  # noqa: F811
    config = selinux_config(type="spc_t")
    config.linux.security_context.privileged = True
    sandbox = make_sandbox(privileged=True)
    oci = build(rootfs, config, sandbox=sandbox, apparmor_enabled=False, selinux_enabled=True)
    assert "selinuxLabel" not in oci["process"] and "mountLabel" not in oci["linux"]


def test_containers_of_a_pod_share_its_level_and_pods_differ(rootfs: Path) -> None:  # noqa: F811
    def label(pod_id: str, name: str) -> str:
        config = selinux_config()
        config.metadata.name = name
        sandbox = make_sandbox(pod_id=pod_id)
        oci = build(rootfs, config, sandbox=sandbox, apparmor_enabled=False, selinux_enabled=True)
        return str(oci["process"]["selinuxLabel"])

    first, second = label("pod-a", "one"), label("pod-a", "two")
    assert first == second
    assert re.fullmatch(r"system_u:system_r:container_t:s0:c\d+,c\d+", first), first
    low, high = (int(c) for c in re.findall(r"c(\d+)", first))
    assert low < high < selinux.CATEGORIES
    assert label("pod-b", "one") != first


def test_bad_selinux_options_are_invalid(rootfs: Path) -> None:  # noqa: F811
    for options in ({"type": "a:b"}, {"user": "x y"}, {"level": "s0 c1"}):
        with pytest.raises(InvalidArgument, match="selinux_options"):
            build(rootfs, selinux_config(**options), apparmor_enabled=False, selinux_enabled=True)


def test_relabel_targets_only_with_a_mount_label(rootfs: Path, tmp_path: Path) -> None:  # noqa: F811
    config = selinux_config()
    config.mounts.extend(
        [
            pb.Mount(container_path="/a", host_path=str(tmp_path / "a"), selinux_relabel=True),
            pb.Mount(container_path="/b", host_path=str(tmp_path / "b")),
        ]
    )
    on = build(rootfs, config, apparmor_enabled=False, selinux_enabled=True)
    from cri_runtime.cri import convert

    model_config = convert.container_config(config)
    assert spec.relabel_targets(model_config, on) == [(tmp_path / "a", on["linux"]["mountLabel"])]
    off = build(rootfs, config, apparmor_enabled=False, selinux_enabled=False)
    assert spec.relabel_targets(model_config, off) == []


def test_policy_contexts_come_from_lxc_contexts(tmp_path: Path) -> None:
    (tmp_path / "config").write_text("SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    contexts = tmp_path / "targeted" / "contexts"
    contexts.mkdir(parents=True)
    (contexts / "lxc_contexts").write_text(
        'process = "system_u:system_r:container_t:s0"\nfile = "system_u:object_r:svirt_sandbox_file_t:s0"\n'
    )
    assert host_selinux.container_contexts(tmp_path / "config") == (
        "system_u:system_r:container_t:s0",
        "system_u:object_r:svirt_sandbox_file_t:s0",
    )
    assert host_selinux.container_contexts(tmp_path / "absent") == (
        host_selinux.DEFAULT_PROCESS_CONTEXT,
        host_selinux.DEFAULT_FILE_CONTEXT,
    )


@pytest.mark.root
def test_relabel_sets_the_xattr_on_the_tree_and_refuses_system_paths(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "sub").mkdir(parents=True)
    (volume / "sub" / "file").write_text("x")
    os.symlink("/etc/hostname", volume / "link")
    label = "system_u:object_r:container_file_t:s0:c1,c2"
    try:
        host_selinux.relabel(volume, label)
    except FailedPrecondition as exc:  # a file system without security.* xattrs
        pytest.skip(str(exc))
    for path in (volume, volume / "sub", volume / "sub" / "file"):
        assert os.getxattr(path, "security.selinux").rstrip(b"\0").decode() == label
    with pytest.raises(InvalidArgument, match="break the host"):
        host_selinux.relabel(Path("/usr/"), label)


def test_check_reports_the_lsms_of_this_host() -> None:
    findings = check.check_confinement()
    texts = [f.what for f in findings]
    assert all(f.area == "lsm" for f in findings)
    if not HOST_HAS_APPARMOR:
        assert any("AppArmor is not enabled" in t for t in texts), texts
    if not host_selinux.enabled():
        assert any("SELinux is not enabled" in t for t in texts), texts


# --- a real daemon on this host (no AppArmor) --------------------------------------------------


def container_config(
    env: Env, name: str, profile: pb.SecurityProfile | None, legacy: str = ""
) -> pb.ContainerConfig:
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=env.image),
        command=["sh", "-c", "cat /proc/self/attr/current 2>/dev/null || echo no-lsm-attr; sleep 100"],
        log_path=f"{name}.log",
    )
    if profile is not None:
        config.linux.security_context.apparmor.CopyFrom(profile)
    config.linux.security_context.apparmor_profile = legacy
    return config


@pytest.mark.root
@pytest.mark.skipif(HOST_HAS_APPARMOR, reason="this host has AppArmor; the VM test covers it")
def test_without_apparmor_localhost_is_refused_and_leaves_nothing(env: Env) -> None:
    pod = env.pod("confined")
    before_mounts = mounts_under(env.daemon.state)
    for name, profile, legacy in (
        (
            "local",
            pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="k8s-deny"),
            "",
        ),
        ("legacy", None, "localhost/k8s-deny"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            env.cri.create_container(
                pod, name, env.image, config=container_config(env, name, profile, legacy)
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'k8s-deny'" in (err.value.details() or "")
        assert "AppArmor is not enabled on this host" in (err.value.details() or "")
    bad = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="../escape")
    with pytest.raises(grpc.RpcError) as err:
        env.cri.create_container(pod, "bad", env.image, config=container_config(env, "bad", bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing of the refused containers: no record, no directory, no mount.
    assert env.cri.list_containers() == []
    assert [p for p in (env.daemon.state / "containers").iterdir()] == []
    assert [p for p in (env.daemon.root / "containers").iterdir()] == []
    assert mounts_under(env.daemon.state) == before_mounts
    # The name is free again: the same container without the profile runs.
    cid = env.cri.create_container(pod, "local", env.image, config=container_config(env, "local", None))
    env.cri.start_container(cid)
    assert exec_out(env.cri, cid, "echo", "ok") == "ok\n"


@pytest.mark.root
@pytest.mark.skipif(HOST_HAS_APPARMOR, reason="this host has AppArmor; the VM test covers it")
def test_without_apparmor_runtime_default_and_unconfined_run(env: Env) -> None:
    pod = env.pod("plain")
    for name, profile, legacy in (
        ("default", pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault), ""),
        ("unconfined", pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined), ""),
        ("legacy-default", None, "runtime/default"),
    ):
        cid = env.cri.create_container(
            pod, name, env.image, config=container_config(env, name, profile, legacy)
        )
        env.cri.start_container(cid)
        assert exec_out(env.cri, cid, "echo", name) == f"{name}\n"
        # The spec the OCI runtime got (run_dir/bundle/config.json) carries no profile or label.
        oci = json.loads((env.daemon.state / "containers" / cid / "bundle" / "config.json").read_text())
        assert "apparmorProfile" not in oci["process"] and "selinuxLabel" not in oci["process"]
        env.cri.stop_container(cid, timeout=1)
        assert wait_exited(env.cri, cid).state == pb.ContainerState.CONTAINER_EXITED


def test_sandbox_context_carries_the_pods_selinux_options() -> None:
    context = dataclasses.replace(make_sandbox(), selinux_options=SELinuxOptions(level="s0:c3,c4"))
    assert selinux.pod_level(context.pod_id, context.selinux_options) == "s0:c3,c4"


def test_exec_process_carries_the_containers_profile_and_label(tmp_path: Path) -> None:
    # The exec process is the container's own process spec with other args (as CRI-O builds it),
    # so it runs under the container's AppArmor profile and SELinux label.
    from cri_runtime.oci.conmon import Executor

    executor = Executor("runc", "/usr/sbin/runc", tmp_path / "exec")
    cid = "a" * 64
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    process = {
        "args": ["sleep", "100"],
        "terminal": True,
        "apparmorProfile": "k8s-deny-write",
        "selinuxLabel": "system_u:system_r:container_t:s0:c1,c2",
        "user": {"uid": 0, "gid": 0},
    }
    (bundle / "config.json").write_text(json.dumps({"process": process}))
    executor.container_dir(cid).mkdir(parents=True)
    (executor.container_dir(cid) / "monitor.json").write_text(json.dumps({"bundle": str(bundle)}))
    exec_process = executor._exec_process(cid, ["cat", "/proc/self/attr/current"])
    assert exec_process["args"] == ["cat", "/proc/self/attr/current"] and exec_process["terminal"] is False
    assert exec_process["apparmorProfile"] == "k8s-deny-write"
    assert exec_process["selinuxLabel"] == "system_u:system_r:container_t:s0:c1,c2"
