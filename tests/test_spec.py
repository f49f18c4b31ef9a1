"""The OCI spec builder: a CRI ContainerConfig and an image config in, a config.json dict out.

Pure unit tests: a fake root file system in tmp_path holds /etc/passwd and /etc/group, devices
are the host's /dev/null and /dev/zero, and nothing runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.cri import convert
from cri_runtime.errors import InvalidArgument
from cri_runtime.oci import seccomp, spec

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment, and a NIS entry that must be skipped
+nis::::::
app:x:1000:1000:App:/home/app:/bin/sh
daemon:x:2:2::/:/bin/false
"""
GROUP = """\
root:x:0:
app:x:1000:
video:x:44:app,daemon
audio:x:29: app
staff:x:50:daemon
"""

HOST_CAPS = spec.ALL_CAPABILITIES  # tests say what "all" is, independent of the test host


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def make_sandbox(**changes: Any) -> spec.SandboxContext:
    base = spec.SandboxContext(
        pod_id="pod-1",
        hostname="web-0",
        netns_path="/run/pycri/ns/net/pod-1",
        ipc_ns_path="/run/pycri/ns/ipc/pod-1",
        uts_ns_path="/run/pycri/ns/uts/pod-1",
        pid_ns_path="/proc/4242/ns/pid",
        pid_mode="pod",
        hosts_path="/run/pycri/pods/pod-1/hosts",
        resolv_path="/run/pycri/pods/pod-1/resolv.conf",
        hostname_path="/run/pycri/pods/pod-1/hostname",
        shm_path="/run/pycri/pods/pod-1/shm",
        sysctls={},
        privileged=False,
    )
    return dataclasses.replace(base, **changes)


def make_config(**fields: Any) -> pb.ContainerConfig:
    fields.setdefault("metadata", pb.ContainerMetadata(name="web"))
    fields.setdefault("image", pb.ImageSpec(image="docker.io/library/busybox:latest"))
    return pb.ContainerConfig(**fields)


def build(
    rootfs: Path,
    config: pb.ContainerConfig | None = None,
    *,
    image: dict[str, Any] | None = None,
    sandbox: spec.SandboxContext | None = None,
    **options: Any,
) -> dict[str, Any]:
    options.setdefault("oom_score_adj_floor", None)
    options.setdefault("host_capabilities", HOST_CAPS)
    options.setdefault("cgroups_path", "/kubepods/pod-1/ctr-1")
    # The spec builder takes pycri's own config; the servicer converts the CRI request the same way.
    return spec.build_container_spec(
        container_id="ctr-1",
        config=convert.container_config(config if config is not None else make_config()),
        image_config={"config": image if image is not None else {"Cmd": ["/bin/sh"]}},
        sandbox=sandbox or make_sandbox(),
        rootfs=rootfs,
        **options,
    )


def mounts_by_destination(oci: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["destination"]: m for m in oci["mounts"]}


def privileged_config(**fields: Any) -> pb.ContainerConfig:
    config = make_config(**fields)
    config.linux.security_context.privileged = True
    return config


# --- the whole spec ----------------------------------------------------------------------------


def test_spec_is_json_serialisable_and_has_the_oci_sections(rootfs: Path) -> None:
    oci = build(rootfs)
    assert json.loads(json.dumps(oci)) == oci
    assert {"ociVersion", "root", "process", "mounts", "linux"} <= oci.keys()
    assert oci["ociVersion"].startswith("1.")
    assert oci["root"] == {"path": str(rootfs), "readonly": False}
    assert oci["linux"]["cgroupsPath"] == "/kubepods/pod-1/ctr-1"
    assert "hostname" not in oci  # the pod's UTS namespace already has its name


def test_annotations_carry_the_config_and_name_the_sandbox(rootfs: Path) -> None:
    config = make_config(annotations={"team": "web", "io.kubernetes.cri.sandbox-id": "forged"})
    annotations = build(rootfs, config)["annotations"]
    assert annotations["team"] == "web"
    assert annotations["io.kubernetes.cri.container-type"] == "container"
    assert annotations["io.kubernetes.cri.sandbox-id"] == "pod-1"
    assert annotations["io.kubernetes.cri.container-name"] == "web"


def test_tty_and_read_only_root_and_no_new_privileges_reach_the_spec(rootfs: Path) -> None:
    config = make_config(tty=True)
    config.linux.security_context.readonly_rootfs = True
    config.linux.security_context.no_new_privs = True
    oci = build(rootfs, config)
    assert oci["process"]["terminal"] is True
    assert oci["process"]["noNewPrivileges"] is True
    assert oci["root"]["readonly"] is True
    assert "apparmorProfile" not in oci["process"]


def test_without_apparmor_and_selinux_the_spec_carries_no_profile_or_label(rootfs: Path) -> None:
    # Where the LSMs are off (this host): RuntimeDefault is a no-op and SELinux options give no
    # label; tests/test_apparmor.py covers the spec where they are on.
    config = make_config()
    security = config.linux.security_context
    security.apparmor.profile_type = pb.SecurityProfile.RuntimeDefault
    security.selinux_options.type = "container_t"
    oci = build(rootfs, config, apparmor_enabled=False, selinux_enabled=False)
    assert "apparmorProfile" not in oci["process"] and "selinuxLabel" not in oci["process"]
    assert "mountLabel" not in oci["linux"]


# --- command -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "command", "args", "expected"),
    [
        (["/ep"], ["c1", "c2"], [], [], ["/ep", "c1", "c2"]),
        (["/ep"], ["c1"], ["/cmd"], [], ["/cmd"]),  # command drops the image's Cmd
        (["/ep"], ["c1"], [], ["a1"], ["/ep", "a1"]),  # args replace the Cmd only
        (["/ep"], ["c1"], ["/cmd"], ["a1", "a2"], ["/cmd", "a1", "a2"]),
        (None, ["/bin/sh", "-c", "x"], [], [], ["/bin/sh", "-c", "x"]),
        (None, ["/bin/sh"], [], ["/bin/echo", "hi"], ["/bin/echo", "hi"]),
        (["/ep"], None, [], [], ["/ep"]),
        (None, None, ["/cmd"], ["a"], ["/cmd", "a"]),
        ([], [], [], ["/only-args"], ["/only-args"]),
    ],
)
def test_command_resolution_follows_docker(
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    command: list[str],
    args: list[str],
    expected: list[str],
) -> None:
    image = {"config": {"Entrypoint": entrypoint, "Cmd": cmd}}
    assert spec.resolve_command(image, command, args) == expected


def test_no_command_anywhere_is_invalid_argument(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="no command specified"):
        spec.resolve_command({"config": {"Entrypoint": None, "Cmd": None}}, [], [])
    with pytest.raises(InvalidArgument, match="no command specified"):
        build(rootfs, image={})


def test_process_args_come_from_command_resolution(rootfs: Path) -> None:
    oci = build(rootfs, make_config(args=["-c", "echo hi"]), image={"Entrypoint": ["/bin/sh"], "Cmd": ["x"]})
    assert oci["process"]["args"] == ["/bin/sh", "-c", "echo hi"]


# --- environment and working directory ---------------------------------------------------------


def test_env_merges_defaults_image_and_config_with_later_winning_in_place(rootfs: Path) -> None:
    config = make_config(envs=[pb.KeyValue(key="A", value=b"config"), pb.KeyValue(key="C", value=b"3")])
    image = {"Cmd": ["x"], "Env": ["PATH=/image/bin", "A=image", "B=2"]}
    env = build(rootfs, config, image=image)["process"]["env"]
    assert env == ["PATH=/image/bin", "HOSTNAME=web-0", "A=config", "B=2", "C=3"]


def test_env_has_a_default_path_when_nobody_sets_one(rootfs: Path) -> None:
    env = build(rootfs)["process"]["env"]
    assert f"PATH={spec.DEFAULT_PATH_ENV}" in env
    assert "HOSTNAME=web-0" in env


def test_env_config_may_override_hostname(rootfs: Path) -> None:
    config = make_config(envs=[pb.KeyValue(key="HOSTNAME", value=b"mine")])
    env = build(rootfs, config)["process"]["env"]
    assert "HOSTNAME=mine" in env and "HOSTNAME=web-0" not in env


@pytest.mark.parametrize(
    ("config_dir", "image_dir", "expected"),
    [
        ("/srv/app", "/image", "/srv/app"),
        ("", "/image/dir/", "/image/dir"),
        ("", None, "/"),
        ("", "rel", "/rel"),
    ],
)
def test_working_dir_prefers_config_then_image_then_root(
    rootfs: Path, config_dir: str, image_dir: str | None, expected: str
) -> None:
    oci = build(rootfs, make_config(working_dir=config_dir), image={"Cmd": ["x"], "WorkingDir": image_dir})
    assert oci["process"]["cwd"] == expected


def test_relative_working_dir_is_invalid_argument(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="working_dir"):
        build(rootfs, make_config(working_dir="srv"))


def test_ensure_working_dir_creates_missing_directories_owned_by_the_user(rootfs: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    spec.ensure_working_dir(rootfs, "/srv/app/data", uid, gid)
    created = rootfs / "srv" / "app" / "data"
    assert created.is_dir()
    assert (created.stat().st_uid, created.stat().st_gid) == (uid, gid)
    assert created.stat().st_mode & 0o777 == 0o755
    spec.ensure_working_dir(rootfs, "/srv/app/data", uid, gid)  # existing: nothing to do


def test_ensure_working_dir_never_leaves_the_rootfs_through_a_symlink(tmp_path: Path, rootfs: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (rootfs / "escape").symlink_to(outside)  # absolute host path: means rootfs/<that path>
    (rootfs / "up").symlink_to("../../../../..")
    spec.ensure_working_dir(rootfs, "/escape/work", os.getuid(), os.getgid())
    spec.ensure_working_dir(rootfs, "/up/work2", os.getuid(), os.getgid())
    assert list(outside.iterdir()) == []
    assert (rootfs / str(outside).lstrip("/") / "work").is_dir()
    assert (rootfs / "work2").is_dir()


def test_ensure_working_dir_on_a_file_is_invalid_argument(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="working directory"):
        spec.ensure_working_dir(rootfs, "/etc/passwd", 0, 0)
    with pytest.raises(InvalidArgument, match="working directory"):
        spec.ensure_working_dir(rootfs, "/etc/passwd/sub", 0, 0)


# --- users and groups --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_user", "expected"),
    [
        ("", (0, 0, [0])),
        ("root", (0, 0, [0])),
        ("app", (1000, 1000, [1000, 44, 29])),
        ("1000", (1000, 1000, [1000, 44, 29])),  # numeric uid: its name still finds its groups
        ("app:video", (1000, 44, [44, 29])),
        ("app:50", (1000, 50, [50, 44, 29])),
        ("1000:2000", (1000, 2000, [2000, 44, 29])),
        ("4321", (4321, 0, [0])),  # not in passwd: gid 0, as Docker
        ("4321:4321", (4321, 4321, [4321])),
        ("daemon", (2, 2, [2, 44, 50])),
    ],
)
def test_image_user_forms_resolve_through_passwd_and_group(
    rootfs: Path, image_user: str, expected: tuple[int, int, list[int]]
) -> None:
    assert spec.resolve_user(rootfs, image_user, None, "", None, []) == expected


def test_run_as_user_overrides_the_image_user(rootfs: Path) -> None:
    assert spec.resolve_user(rootfs, "app", 0, "", None, []) == (0, 0, [0])
    assert spec.resolve_user(rootfs, "root", 1000, "", 29, []) == (1000, 29, [29, 44])


def test_run_as_username_resolves_by_name(rootfs: Path) -> None:
    assert spec.resolve_user(rootfs, "", None, "daemon", None, []) == (2, 2, [2, 44, 50])


def test_supplemental_groups_are_added_once(rootfs: Path) -> None:
    assert spec.resolve_user(rootfs, "app", None, "", None, [44, 7, 7]) == (1000, 1000, [1000, 44, 29, 7])


def test_strict_supplemental_groups_policy_ignores_the_image_groups(rootfs: Path) -> None:
    config = make_config()
    security = config.linux.security_context
    security.run_as_username = "app"
    security.supplemental_groups.append(7)
    security.supplemental_groups_policy = pb.SupplementalGroupsPolicy.Strict
    assert build(rootfs, config)["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 7]}


def test_user_reaches_the_process(rootfs: Path) -> None:
    config = make_config()
    config.linux.security_context.run_as_user.value = 1000
    config.linux.security_context.supplemental_groups.extend([5])
    user = build(rootfs, config)["process"]["user"]
    assert user == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 44, 29, 5]}


def test_run_as_group_without_a_user_is_invalid_argument(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="run_as_group"):
        spec.resolve_user(rootfs, "app", None, "", 44, [])
    config = make_config()
    config.linux.security_context.run_as_group.value = 44
    with pytest.raises(InvalidArgument, match="run_as_group"):
        build(rootfs, config)


def test_unknown_user_or_group_is_invalid_argument_naming_it(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="'nosuch'"):
        spec.resolve_user(rootfs, "nosuch", None, "", None, [])
    with pytest.raises(InvalidArgument, match="'ghost'"):
        spec.resolve_user(rootfs, "", None, "ghost", None, [])
    with pytest.raises(InvalidArgument, match="'nogroup'"):
        spec.resolve_user(rootfs, "app:nogroup", None, "", None, [])


def test_numeric_user_without_passwd_file_is_fine(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert spec.resolve_user(empty, "1234", None, "", None, [9]) == (1234, 0, [0, 9])
    assert spec.resolve_user(empty, "", None, "", None, []) == (0, 0, [0])
    with pytest.raises(InvalidArgument, match="'app'"):
        spec.resolve_user(empty, "app", None, "", None, [])


def test_out_of_range_ids_are_invalid_argument(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument):
        spec.resolve_user(rootfs, "", -1, "", None, [])
    with pytest.raises(InvalidArgument):
        spec.resolve_user(rootfs, "4294967295", None, "", None, [])
    with pytest.raises(InvalidArgument, match="supplemental_groups"):
        spec.resolve_user(rootfs, "", None, "", None, [-5])


def test_passwd_symlinks_are_resolved_inside_the_rootfs(tmp_path: Path, rootfs: Path) -> None:
    host_etc = tmp_path / "host-etc"
    host_etc.mkdir()
    (host_etc / "passwd").write_text("evil:x:4242:4242::/:/bin/sh\n")
    passwd = rootfs / "etc" / "passwd"
    passwd.unlink()
    passwd.symlink_to(host_etc / "passwd")  # absolute: must mean rootfs/<tmp>/host-etc/passwd
    with pytest.raises(InvalidArgument, match="'evil'"):
        spec.resolve_user(rootfs, "evil", None, "", None, [])
    passwd.unlink()
    passwd.symlink_to("../../../../../../../../" + str(host_etc / "passwd"))  # '..' stops at the root
    with pytest.raises(InvalidArgument, match="'evil'"):
        spec.resolve_user(rootfs, "evil", None, "", None, [])
    # A symlink that stays inside is followed.
    (rootfs / "usr" / "lib").mkdir(parents=True)
    (rootfs / "usr" / "lib" / "passwd").write_text("inside:x:77:78::/:/bin/sh\n")
    passwd.unlink()
    passwd.symlink_to("/usr/lib/passwd")
    assert spec.resolve_user(rootfs, "inside", None, "", None, []) == (77, 78, [78])


def test_passwd_that_is_not_a_regular_file_is_refused_without_blocking(rootfs: Path) -> None:
    passwd = rootfs / "etc" / "passwd"
    passwd.unlink()
    os.mkfifo(passwd)
    with pytest.raises(InvalidArgument, match="/etc/passwd"):
        spec.resolve_user(rootfs, "app", None, "", None, [])


def test_symlink_loop_in_rootfs_is_invalid_argument(rootfs: Path) -> None:
    passwd = rootfs / "etc" / "passwd"
    passwd.unlink()
    passwd.symlink_to("/etc/passwd")
    with pytest.raises(InvalidArgument, match="/etc/passwd"):
        spec.resolve_user(rootfs, "app", None, "", None, [])


# --- capabilities ------------------------------------------------------------------------------


def caps_of(
    rootfs: Path, add: Sequence[str] = (), drop: Sequence[str] = (), ambient: Sequence[str] = ()
) -> dict[str, list[str]]:
    config = make_config()
    capabilities = config.linux.security_context.capabilities
    capabilities.add_capabilities.extend(add)
    capabilities.drop_capabilities.extend(drop)
    capabilities.add_ambient_capabilities.extend(ambient)
    return build(rootfs, config)["process"]["capabilities"]


def test_default_capabilities_are_containerds_set(rootfs: Path) -> None:
    caps = caps_of(rootfs)
    for kind in ("bounding", "effective", "permitted"):
        assert set(caps[kind]) == set(spec.DEFAULT_CAPABILITIES)
    assert caps.get("inheritable", []) == [] and caps.get("ambient", []) == []


def test_capabilities_are_added_and_dropped_by_any_spelling(rootfs: Path) -> None:
    caps = caps_of(rootfs, add=["sys_admin", "CAP_NET_ADMIN", "Sys_Time"], drop=["chown", "CAP_KILL"])
    bounding = set(caps["bounding"])
    assert {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_TIME"} <= bounding
    assert "CAP_CHOWN" not in bounding and "CAP_KILL" not in bounding
    assert caps["effective"] == caps["bounding"] == caps["permitted"]


def test_drop_all_then_add_keeps_only_the_added(rootfs: Path) -> None:
    caps = caps_of(rootfs, add=["NET_BIND_SERVICE"], drop=["ALL"])
    assert caps["bounding"] == ["CAP_NET_BIND_SERVICE"]


def test_add_all_then_drop_removes_from_everything(rootfs: Path) -> None:
    caps = caps_of(rootfs, add=["all"], drop=["CHOWN"])
    assert set(caps["bounding"]) == set(HOST_CAPS) - {"CAP_CHOWN"}


def test_all_means_the_capabilities_pycri_holds(rootfs: Path) -> None:
    config = make_config()
    config.linux.security_context.capabilities.add_capabilities.append("ALL")
    held = ("CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_KILL")
    assert build(rootfs, config, host_capabilities=held)["process"]["capabilities"]["bounding"] == [
        "CAP_CHOWN",
        "CAP_KILL",
        "CAP_SYS_ADMIN",
    ]


def test_current_capabilities_reads_the_bounding_set(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapBnd:\t0000000000200001\n")  # bits 0 and 21
    assert spec.current_capabilities(status) == ("CAP_CHOWN", "CAP_SYS_ADMIN")


def test_ambient_capabilities_are_inheritable_and_held(rootfs: Path) -> None:
    caps = caps_of(rootfs, ambient=["net_admin"])
    assert caps["ambient"] == caps["inheritable"] == ["CAP_NET_ADMIN"]
    assert "CAP_NET_ADMIN" in caps["bounding"] and "CAP_NET_ADMIN" in caps["permitted"]


@pytest.mark.parametrize("field", ["add", "drop", "ambient"])
def test_unknown_capability_is_invalid_argument_naming_it(rootfs: Path, field: str) -> None:
    with pytest.raises(InvalidArgument, match="CAP_FLY"):
        caps_of(rootfs, **{field: ["CAP_FLY"]})


# --- privileged --------------------------------------------------------------------------------


def test_privileged_container_gets_everything(rootfs: Path) -> None:
    config = privileged_config()
    config.linux.security_context.seccomp.profile_type = pb.SecurityProfile.RuntimeDefault
    config.linux.security_context.capabilities.drop_capabilities.append("ALL")
    oci = build(rootfs, config, sandbox=make_sandbox(privileged=True))
    caps = oci["process"]["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(HOST_CAPS)
    linux = oci["linux"]
    assert "seccomp" not in linux
    assert not linux.get("maskedPaths") and not linux.get("readonlyPaths")
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert any(d["path"] == "/dev/null" and (d["major"], d["minor"]) == (1, 3) for d in linux["devices"])
    mounts = mounts_by_destination(oci)
    assert "rw" in mounts["/sys"]["options"] and "ro" not in mounts["/sys"]["options"]
    assert "rw" in mounts["/sys/fs/cgroup"]["options"]


def test_privileged_container_in_an_unprivileged_pod_is_invalid_argument(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="privileged"):
        build(rootfs, privileged_config(), sandbox=make_sandbox(privileged=False))


# --- seccomp -----------------------------------------------------------------------------------


def seccomp_of(rootfs: Path, config: pb.ContainerConfig, **options: Any) -> dict[str, Any] | None:
    return build(rootfs, config, **options)["linux"].get("seccomp")


def with_profile(
    kind: Any = None, ref: str = "", legacy: str = "", add_caps: Sequence[str] = ()
) -> pb.ContainerConfig:
    config = make_config()
    security = config.linux.security_context
    if kind is not None:
        security.seccomp.profile_type = kind
        security.seccomp.localhost_ref = ref
    security.seccomp_profile_path = legacy
    security.capabilities.add_capabilities.extend(add_caps)
    return config


def allowed(profile: dict[str, Any]) -> set[str]:
    """Syscalls allowed without argument conditions."""
    return {
        name
        for rule in profile.get("syscalls", [])
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
        for name in rule["names"]
    }


def test_runtime_default_is_the_built_in_profile(rootfs: Path) -> None:
    profile = seccomp_of(rootfs, with_profile(pb.SecurityProfile.RuntimeDefault))
    assert profile is not None
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    names = allowed(profile)
    assert {"read", "write", "openat", "execve", "futex", "epoll_wait", "exit_group"} <= names
    dangerous = {"kexec_load", "open_by_handle_at", "init_module", "finit_module", "delete_module"}
    dangerous |= {"iopl", "ioperm", "swapon", "swapoff", "reboot", "mount", "umount2", "unshare", "setns"}
    dangerous |= {"bpf", "perf_event_open", "clone3", "keyctl", "userfaultfd"}
    assert not names & dangerous
    # clone only without namespace flags; clone3 answers ENOSYS so that libc falls back to it.
    clone = [rule for rule in profile["syscalls"] if "clone" in rule["names"]]
    assert clone and all(rule["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" for rule in clone)
    clone3 = next(rule for rule in profile["syscalls"] if "clone3" in rule["names"])
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == 38


def test_runtime_default_grants_mount_and_namespaces_with_cap_sys_admin(rootfs: Path) -> None:
    profile = seccomp_of(rootfs, with_profile(pb.SecurityProfile.RuntimeDefault, add_caps=["SYS_ADMIN"]))
    assert profile is not None
    assert {"mount", "umount2", "unshare", "setns", "clone", "clone3"} <= allowed(profile)
    assert not [rule for rule in profile["syscalls"] if rule["action"] != "SCMP_ACT_ALLOW"]
    assert "kexec_load" not in allowed(profile)


def test_default_profile_architectures_follow_the_host() -> None:
    x86 = seccomp.default_profile([], machine="x86_64", kernel=(6, 1))
    assert x86["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert "arch_prctl" in allowed(x86)
    s390 = seccomp.default_profile([], machine="s390x", kernel=(6, 1))
    assert s390["architectures"] == ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]
    assert "arch_prctl" not in allowed(s390) and "s390_runtime_instr" in allowed(s390)
    clone = next(rule for rule in s390["syscalls"] if "clone" in rule["names"])
    assert clone["args"][0]["index"] == 1  # flags are the second argument there


def test_default_profile_allows_ptrace_only_on_kernels_without_the_seccomp_bypass() -> None:
    assert "ptrace" in allowed(seccomp.default_profile([], machine="x86_64", kernel=(5, 10)))
    assert "ptrace" not in allowed(seccomp.default_profile([], machine="x86_64", kernel=(4, 4)))
    old_with_cap = seccomp.default_profile(["CAP_SYS_PTRACE"], machine="x86_64", kernel=(4, 4))
    assert "ptrace" in allowed(old_with_cap)


def test_unconfined_and_absent_profiles_mean_no_seccomp(rootfs: Path) -> None:
    assert seccomp_of(rootfs, with_profile(pb.SecurityProfile.Unconfined)) is None
    assert seccomp_of(rootfs, make_config()) is None


def test_localhost_profile_is_read_from_its_absolute_path(tmp_path: Path, rootfs: Path) -> None:
    path = tmp_path / "profile.json"
    profile = {
        "defaultAction": "SCMP_ACT_LOG",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
    }
    path.write_text(json.dumps(profile))
    assert seccomp_of(rootfs, with_profile(pb.SecurityProfile.Localhost, ref=str(path))) == profile


def test_localhost_profile_in_docker_format_is_converted(tmp_path: Path, rootfs: Path) -> None:
    path = tmp_path / "docker.json"
    path.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "archMap": [
                    {"architecture": seccomp._MACHINES[seccomp.host_machine()][1], "subArchitectures": []}
                ],
                "syscalls": [
                    {"name": "read", "action": "SCMP_ACT_ALLOW"},
                    {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                ],
            }
        )
    )
    profile = seccomp_of(rootfs, with_profile(pb.SecurityProfile.Localhost, ref=str(path)))
    assert profile is not None
    assert profile["syscalls"] == [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]
    assert len(profile["architectures"]) == 1


def test_localhost_profile_missing_or_invalid_is_invalid_argument(tmp_path: Path, rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        seccomp_of(rootfs, with_profile(pb.SecurityProfile.Localhost, ref=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        seccomp_of(rootfs, with_profile(pb.SecurityProfile.Localhost, ref=str(tmp_path / "bad.json")))
    (tmp_path / "noaction.json").write_text('{"syscalls": []}')
    with pytest.raises(InvalidArgument, match="defaultAction"):
        seccomp_of(rootfs, with_profile(pb.SecurityProfile.Localhost, ref=str(tmp_path / "noaction.json")))
    with pytest.raises(InvalidArgument, match="localhost_ref"):
        seccomp_of(rootfs, with_profile(pb.SecurityProfile.Localhost, ref="profile.json"))


@pytest.mark.parametrize("legacy", ["runtime/default", "docker/default"])
def test_legacy_default_profile_names(rootfs: Path, legacy: str) -> None:
    profile = seccomp_of(rootfs, with_profile(legacy=legacy))
    assert profile is not None and profile["defaultAction"] == "SCMP_ACT_ERRNO"


def test_legacy_unconfined_and_localhost_profiles(tmp_path: Path, rootfs: Path) -> None:
    assert seccomp_of(rootfs, with_profile(legacy="unconfined")) is None
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.json").write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    relative = seccomp_of(
        rootfs, with_profile(legacy="localhost/p.json"), seccomp_profile_root=tmp_path / "profiles"
    )
    assert relative == {"defaultAction": "SCMP_ACT_ALLOW"}
    absolute = seccomp_of(rootfs, with_profile(legacy=f"localhost/{tmp_path}/profiles/p.json"))
    assert absolute == {"defaultAction": "SCMP_ACT_ALLOW"}
    with pytest.raises(InvalidArgument, match="seccomp_profile_path"):
        seccomp_of(
            rootfs, with_profile(legacy="localhost/../p.json"), seccomp_profile_root=tmp_path / "profiles"
        )
    with pytest.raises(InvalidArgument, match="seccomp_profile_path"):
        seccomp_of(rootfs, with_profile(legacy="localhost/p.json"))  # no root to resolve it against
    with pytest.raises(InvalidArgument, match="seccomp_profile_path"):
        seccomp_of(rootfs, with_profile(legacy="bogus"))


# --- masked and read-only paths ----------------------------------------------------------------


def test_masked_and_readonly_paths_default_to_containerds(rootfs: Path) -> None:
    linux = build(rootfs)["linux"]
    assert linux["maskedPaths"] == list(spec.DEFAULT_MASKED_PATHS)
    assert linux["readonlyPaths"] == list(spec.DEFAULT_READONLY_PATHS)
    assert "/proc/kcore" in linux["maskedPaths"] and "/sys/devices/virtual/powercap" in linux["maskedPaths"]
    assert "/proc/sysrq-trigger" in linux["readonlyPaths"]


def test_masked_and_readonly_paths_from_config_replace_the_defaults(rootfs: Path) -> None:
    config = make_config()
    config.linux.security_context.masked_paths.extend(["/proc/kcore", "/proc/secret"])
    linux = build(rootfs, config)["linux"]
    assert linux["maskedPaths"] == ["/proc/kcore", "/proc/secret"]
    assert linux["readonlyPaths"] == list(spec.DEFAULT_READONLY_PATHS)  # not given: default
    config.linux.security_context.readonly_paths.append("/proc/sys")
    assert build(rootfs, config)["linux"]["readonlyPaths"] == ["/proc/sys"]


# --- mounts ------------------------------------------------------------------------------------


def test_default_mounts_and_pod_files(rootfs: Path) -> None:
    mounts = mounts_by_destination(build(rootfs))
    assert mounts["/proc"]["type"] == "proc"
    assert mounts["/dev"]["type"] == "tmpfs" and "mode=755" in mounts["/dev"]["options"]
    assert "size=65536k" in mounts["/dev"]["options"] and "strictatime" in mounts["/dev"]["options"]
    assert {"newinstance", "ptmxmode=0666", "mode=0620", "gid=5"} <= set(mounts["/dev/pts"]["options"])
    assert mounts["/dev/mqueue"]["type"] == "mqueue"
    assert mounts["/sys"]["type"] == "sysfs" and "ro" in mounts["/sys"]["options"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup" and "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert mounts["/dev/shm"] == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": "/run/pycri/pods/pod-1/shm",
        "options": ["rbind", "rprivate", "rw"],
    }
    assert mounts["/etc/hosts"]["source"] == "/run/pycri/pods/pod-1/hosts"
    assert mounts["/etc/resolv.conf"]["source"] == "/run/pycri/pods/pod-1/resolv.conf"
    assert mounts["/etc/hostname"]["source"] == "/run/pycri/pods/pod-1/hostname"
    assert "rw" in mounts["/etc/hosts"]["options"]


def test_private_shm_and_no_pod_files_when_the_sandbox_has_none(rootfs: Path) -> None:
    sandbox = make_sandbox(shm_path=None, hosts_path=None, resolv_path=None, hostname_path=None)
    mounts = mounts_by_destination(build(rootfs, sandbox=sandbox))
    assert mounts["/dev/shm"]["type"] == "tmpfs" and "size=65536k" in mounts["/dev/shm"]["options"]
    assert not {"/etc/hosts", "/etc/resolv.conf", "/etc/hostname"} & mounts.keys()


def test_pod_files_are_read_only_with_a_read_only_root(rootfs: Path) -> None:
    config = make_config()
    config.linux.security_context.readonly_rootfs = True
    mounts = mounts_by_destination(build(rootfs, config))
    assert "ro" in mounts["/etc/hosts"]["options"] and "ro" in mounts["/etc/resolv.conf"]["options"]
    assert "rw" in mounts["/dev/shm"]["options"]


def test_config_mounts_map_readonly_and_propagation(rootfs: Path) -> None:
    config = make_config(
        mounts=[
            pb.Mount(container_path="/data", host_path="/srv/data"),
            pb.Mount(container_path="/cfg/", host_path="/srv/cfg", readonly=True),
            pb.Mount(
                container_path="/slave",
                host_path="/mnt/a",
                propagation=pb.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            ),
        ]
    )
    oci = build(rootfs, config)
    mounts = mounts_by_destination(oci)
    assert mounts["/data"] == {
        "destination": "/data",
        "type": "bind",
        "source": "/srv/data",
        "options": ["rbind", "rprivate", "rw"],
    }
    assert mounts["/cfg"]["options"] == ["rbind", "rprivate", "ro"]
    assert mounts["/slave"]["options"] == ["rbind", "rslave", "rw"]
    assert oci["linux"]["rootfsPropagation"] == "rslave"


def test_bidirectional_mount_makes_the_root_shared(rootfs: Path) -> None:
    config = make_config(
        mounts=[
            pb.Mount(
                container_path="/slave",
                host_path="/mnt/a",
                propagation=pb.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            ),
            pb.Mount(
                container_path="/shared",
                host_path="/mnt/b",
                propagation=pb.MountPropagation.PROPAGATION_BIDIRECTIONAL,
            ),
        ]
    )
    oci = build(rootfs, config)
    assert mounts_by_destination(oci)["/shared"]["options"] == ["rbind", "rshared", "rw"]
    assert oci["linux"]["rootfsPropagation"] == "rshared"


def test_private_mounts_leave_the_root_propagation_alone(rootfs: Path) -> None:
    config = make_config(mounts=[pb.Mount(container_path="/data", host_path="/srv/data")])
    assert "rootfsPropagation" not in build(rootfs, config)["linux"]


def test_recursive_read_only_mount(rootfs: Path) -> None:
    config = make_config(
        mounts=[pb.Mount(container_path="/data", host_path="/srv", readonly=True, recursive_read_only=True)]
    )
    assert mounts_by_destination(build(rootfs, config))["/data"]["options"] == [
        "rbind",
        "rprivate",
        "ro",
        "rro",
    ]


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (pb.Mount(container_path="/d", host_path="/s", recursive_read_only=True), "needs readonly"),
        (
            pb.Mount(
                container_path="/d",
                host_path="/s",
                readonly=True,
                recursive_read_only=True,
                propagation=pb.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            ),
            "PROPAGATION_PRIVATE",
        ),
        (pb.Mount(container_path="data", host_path="/s"), r"mounts\[0\]\.container_path"),
        (pb.Mount(container_path="", host_path="/s"), r"mounts\[0\]\.container_path"),
        (pb.Mount(container_path="/d", host_path="rel"), r"mounts\[0\]\.host_path"),
        (
            pb.Mount(container_path="/d", host_path="/s", uidMappings=[pb.IDMapping(length=1)]),
            "user namespaces",
        ),
    ],
)
def test_bad_mounts_are_invalid_argument(rootfs: Path, mount: pb.Mount, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build(rootfs, make_config(mounts=[mount]))


def test_an_image_volume_not_mounted_by_the_manager_is_refused_by_the_spec(rootfs: Path) -> None:
    # The container manager turns image volumes into read-only host paths before the spec.
    mount = pb.Mount(container_path="/d", image=pb.ImageSpec(image="busybox"))
    with pytest.raises(InvalidArgument, match="image volume must be mounted"):
        build(rootfs, make_config(mounts=[mount]))


def test_mounts_are_ordered_parents_first(rootfs: Path) -> None:
    config = make_config(
        mounts=[
            pb.Mount(container_path="/data/a/b", host_path="/s3"),
            pb.Mount(container_path="/data/a", host_path="/s2"),
            pb.Mount(container_path="/data", host_path="/s1"),
            pb.Mount(container_path="/dev/fuse-dir", host_path="/s4"),
        ]
    )
    order = [m["destination"] for m in build(rootfs, config)["mounts"]]
    assert order.index("/data") < order.index("/data/a") < order.index("/data/a/b")
    assert order.index("/dev") < order.index("/dev/fuse-dir")
    assert order.index("/sys") < order.index("/sys/fs/cgroup")
    assert order.index("/proc") < order.index("/dev/pts")


def test_config_mount_replaces_a_default_at_the_same_destination(rootfs: Path) -> None:
    config = make_config(
        mounts=[
            pb.Mount(container_path="/etc/hosts", host_path="/my/hosts", readonly=True),
            pb.Mount(container_path="/dev/shm", host_path="/my/shm"),
            pb.Mount(container_path="/data", host_path="/first"),
            pb.Mount(container_path="/data", host_path="/second"),
        ]
    )
    oci = build(rootfs, config)
    destinations = [m["destination"] for m in oci["mounts"]]
    assert (
        destinations.count("/etc/hosts") == destinations.count("/dev/shm") == destinations.count("/data") == 1
    )
    mounts = mounts_by_destination(oci)
    assert mounts["/etc/hosts"]["source"] == "/my/hosts" and "ro" in mounts["/etc/hosts"]["options"]
    assert mounts["/dev/shm"]["source"] == "/my/shm"
    assert mounts["/data"]["source"] == "/second"


def test_config_dev_mount_replaces_the_default_dev_tree(rootfs: Path) -> None:
    config = make_config(mounts=[pb.Mount(container_path="/dev", host_path="/dev")])
    sandbox = make_sandbox(shm_path=None)
    destinations = [m["destination"] for m in build(rootfs, config, sandbox=sandbox)["mounts"]]
    assert "/dev" in destinations
    assert not [d for d in destinations if d.startswith("/dev/")]


def test_host_paths_to_create_lists_missing_host_directories(tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    config = make_config(
        mounts=[
            pb.Mount(container_path="/a", host_path=str(tmp_path / "exists")),
            pb.Mount(container_path="/b", host_path=str(tmp_path / "missing" / "deep")),
            pb.Mount(container_path="/c", host_path=str(tmp_path / "dangling")),
            pb.Mount(container_path="/d", host_path="relative"),
        ]
    )
    assert spec.host_paths_to_create(convert.container_config(config)) == [tmp_path / "missing" / "deep"]


# --- devices -----------------------------------------------------------------------------------


def test_devices_are_created_and_allowed_in_the_device_cgroup(rootfs: Path) -> None:
    config = make_config(
        devices=[
            pb.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw"),
            pb.Device(container_path="/dev/zero", host_path="/dev/zero", permissions=""),
        ]
    )
    linux = build(rootfs, config)["linux"]
    null = os.stat("/dev/null")
    assert linux["devices"][0] == {
        "path": "/dev/mynull",
        "type": "c",
        "major": 1,
        "minor": 3,
        "fileMode": null.st_mode & 0o7777,
        "uid": null.st_uid,
        "gid": null.st_gid,
    }
    assert linux["devices"][1]["path"] == "/dev/zero" and linux["devices"][1]["minor"] == 5
    rules = linux["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"} in rules
    assert {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"} in rules


def test_default_device_cgroup_denies_all_but_the_standard_devices(rootfs: Path) -> None:
    linux = build(rootfs)["linux"]
    rules = linux["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    allowed_devices = {(r.get("major"), r.get("minor")) for r in rules if r["allow"] and r["access"] == "rwm"}
    for device in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, None)]:
        assert device in allowed_devices
    assert "devices" not in linux  # no device nodes beyond what the runtime makes itself


def test_device_directory_brings_every_device_below_it(tmp_path: Path, rootfs: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    directory = tmp_path / "devs"
    (directory / "sub").mkdir(parents=True)
    os.mknod(directory / "one", 0o600 | 0o020000, os.makedev(1, 3))
    os.mknod(directory / "sub" / "two", 0o640 | 0o060000, os.makedev(7, 0))
    (directory / "not-a-device").write_text("x")
    config = make_config(devices=[pb.Device(container_path="/dev/mine", host_path=str(directory))])
    devices = build(rootfs, config)["linux"]["devices"]
    assert [(d["path"], d["type"], d["major"], d["minor"], d["fileMode"]) for d in devices] == [
        ("/dev/mine/one", "c", 1, 3, 0o600),
        ("/dev/mine/sub/two", "b", 7, 0, 0o640),
    ]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (pb.Device(container_path="/dev/x", host_path="/dev/does-not-exist"), "does not exist"),
        (pb.Device(container_path="/dev/x", host_path="/etc/hostname"), "not a device"),
        (pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwx"), "permissions"),
        (pb.Device(container_path="dev/x", host_path="/dev/null"), "container_path"),
        (pb.Device(container_path="/dev/x", host_path="null"), "host_path"),
    ],
)
def test_bad_devices_are_invalid_argument(rootfs: Path, device: pb.Device, message: str) -> None:
    if device.host_path == "/etc/hostname" and not os.path.isfile("/etc/hostname"):
        pytest.skip("needs a regular file at /etc/hostname")
    with pytest.raises(InvalidArgument, match=message):
        build(rootfs, make_config(devices=[device]))


# --- namespaces --------------------------------------------------------------------------------


def namespaces(rootfs: Path, **sandbox: Any) -> dict[str, str | None]:
    found = build(rootfs, sandbox=make_sandbox(**sandbox))["linux"]["namespaces"]
    return {ns["type"]: ns.get("path") for ns in found}


def test_pod_namespaces_are_joined_by_path(rootfs: Path) -> None:
    assert namespaces(rootfs) == {
        "pid": "/proc/4242/ns/pid",
        "network": "/run/pycri/ns/net/pod-1",
        "ipc": "/run/pycri/ns/ipc/pod-1",
        "uts": "/run/pycri/ns/uts/pod-1",
        "mount": None,
    }


def test_pid_namespace_per_mode(rootfs: Path) -> None:
    assert namespaces(rootfs, pid_mode="container", pid_ns_path=None)["pid"] is None  # new
    assert "pid" not in namespaces(rootfs, pid_mode="node", pid_ns_path=None)  # the host's
    target = namespaces(rootfs, pid_mode="target", pid_ns_path="/proc/99/ns/pid")
    assert target["pid"] == "/proc/99/ns/pid"
    with pytest.raises(InvalidArgument, match="PID namespace"):
        namespaces(rootfs, pid_mode="pod", pid_ns_path=None)


def test_host_namespaces_are_absent_and_mount_is_always_new(rootfs: Path) -> None:
    found = namespaces(
        rootfs, netns_path=None, ipc_ns_path=None, uts_ns_path=None, pid_mode="node", pid_ns_path=None
    )
    assert found == {"mount": None}


def test_cgroup_namespace_only_when_asked(rootfs: Path) -> None:
    assert "cgroup" not in namespaces(rootfs)
    oci = build(rootfs, cgroup_namespace=True)
    assert {"type": "cgroup"} in oci["linux"]["namespaces"]


def test_user_namespace_mode_must_match_the_pods(rootfs: Path) -> None:
    config = make_config()
    options = config.linux.security_context.namespace_options.userns_options
    options.mode = pb.NamespaceMode.POD
    with pytest.raises(InvalidArgument, match="pod sandbox has no user namespace"):
        build(rootfs, config)
    options.mode = pb.NamespaceMode.NODE
    build(rootfs, config)
    with pytest.raises(InvalidArgument, match="pod sandbox has a user namespace"):
        build(rootfs, config, sandbox=make_sandbox(userns_path="/run/pycri/ns/user/pod-1"))
    for mode in (pb.NamespaceMode.CONTAINER, pb.NamespaceMode.TARGET):
        options.mode = mode
        with pytest.raises(InvalidArgument, match=r"userns_options: mode .* is not supported"):
            build(rootfs, config)


def test_pod_user_namespace_is_joined_first_with_its_mappings(rootfs: Path) -> None:
    config = make_config()
    config.linux.security_context.namespace_options.userns_options.mode = pb.NamespaceMode.POD
    sandbox = make_sandbox(
        userns_path="/run/pycri/ns/user/pod-1",
        uid_mappings=((0, 1000000, 65536),),
        gid_mappings=((0, 2000000, 65536),),
    )
    linux = build(rootfs, config, sandbox=sandbox)["linux"]
    assert linux["namespaces"][0] == {"type": "user", "path": "/run/pycri/ns/user/pod-1"}
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1000000, "size": 65536}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": 2000000, "size": 65536}]
    assert "uidMappings" not in build(rootfs)["linux"]


def test_sandbox_sysctls_are_passed_on(rootfs: Path) -> None:
    sysctls = {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"}
    assert build(rootfs, sandbox=make_sandbox(sysctls=sysctls))["linux"]["sysctl"] == sysctls
    assert "sysctl" not in build(rootfs)["linux"]


# --- resources ---------------------------------------------------------------------------------


def with_resources(**fields: Any) -> pb.ContainerConfig:
    config = make_config()
    config.linux.resources.CopyFrom(pb.LinuxContainerResources(**fields))
    return config


def test_resources_reach_the_spec(rootfs: Path) -> None:
    config = with_resources(
        cpu_shares=512,
        cpu_quota=50_000,
        cpu_period=100_000,
        cpuset_cpus="0-1,3",
        cpuset_mems="0",
        memory_limit_in_bytes=256 << 20,
        memory_swap_limit_in_bytes=512 << 20,
        oom_score_adj=300,
        hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=4 << 20)],
        unified={"memory.high": "200000000"},
    )
    oci = build(rootfs, config)
    resources = oci["linux"]["resources"]
    assert resources["cpu"] == {
        "shares": 512,
        "quota": 50_000,
        "period": 100_000,
        "cpus": "0-1,3",
        "mems": "0",
    }
    assert resources["memory"] == {"limit": 256 << 20, "swap": 512 << 20}
    assert resources["hugepageLimits"] == [{"pageSize": "2MB", "limit": 4 << 20}]
    assert resources["unified"] == {"memory.high": "200000000"}
    assert oci["process"]["oomScoreAdj"] == 300


def test_zero_resources_are_unset(rootfs: Path) -> None:
    oci = build(rootfs, with_resources(memory_limit_in_bytes=128 << 20))
    resources = oci["linux"]["resources"]
    assert resources["memory"] == {"limit": 128 << 20}  # swap 0: not set
    assert not {"cpu", "hugepageLimits", "unified"} & resources.keys()
    assert oci["process"]["oomScoreAdj"] == 0  # always set: never inherit conmon's -1000


@pytest.mark.parametrize(
    ("requested", "floor", "expected"),
    [(-997, -500, -500), (1000, -500, 1000), (-997, None, -997), (5, 5, 5)],
)
def test_oom_score_adj_is_clamped_up_to_the_floor(
    rootfs: Path, requested: int, floor: int | None, expected: int
) -> None:
    oci = build(rootfs, with_resources(oom_score_adj=requested), oom_score_adj_floor=floor)
    assert oci["process"]["oomScoreAdj"] == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"oom_score_adj": 1001}, "oom_score_adj"),
        ({"hugepage_limits": [pb.HugepageLimit(page_size="2M", limit=1)]}, "page_size"),
        ({"cpuset_cpus": "0-a"}, "cpuset_cpus"),
        ({"memory_limit_in_bytes": -5}, "memory_limit_in_bytes"),
        ({"memory_limit_in_bytes": 100 << 20, "memory_swap_limit_in_bytes": 50 << 20}, "memory_swap"),
        ({"cpu_shares": 1}, "cpu_shares"),
        ({"cpu_shares": 262145}, "cpu_shares"),
    ],
)
def test_bad_resources_are_invalid_argument(rootfs: Path, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build(rootfs, with_resources(**fields))


def test_under_the_systemd_driver_crun_keeps_the_container_in_its_scope_as_runc_does(tmp_path: Path) -> None:
    systemd_form = build(tmp_path, cgroups_path="kubepods-besteffort-pod1.slice:pycri:ctr-1")
    assert systemd_form["linux"]["cgroupsPath"] == "kubepods-besteffort-pod1.slice:pycri:ctr-1"
    assert systemd_form["annotations"]["run.oci.systemd.subgroup"] == ""
    assert "run.oci.systemd.subgroup" not in build(tmp_path)["annotations"]


def test_the_node_s_pids_limit_becomes_the_container_s_pids_max(tmp_path: Path) -> None:
    assert build(tmp_path, pids_limit=1024)["linux"]["resources"]["pids"] == {"limit": 1024}
    assert "pids" not in build(tmp_path)["linux"]["resources"]


def _fake_host(tmp_path: Path, *, v2: bool, swap: bool, hugetlb: bool) -> tuple[Path, Path]:
    """A /sys and a cgroup root with only what check_resources_on_host reads."""
    sys_root, cgroup_root = tmp_path / "sys", tmp_path / "cgroup"
    (sys_root / "devices/system/cpu").mkdir(parents=True)
    (sys_root / "devices/system/cpu/online").write_text("0-3\n")
    (sys_root / "kernel/mm/hugepages/hugepages-2048kB").mkdir(parents=True)
    if v2:
        cgroup_root.mkdir()
        controllers = "cpu memory pids" + (" hugetlb" if hugetlb else "")
        (cgroup_root / "cgroup.controllers").write_text(controllers + "\n")
        (cgroup_root / "system.slice").mkdir()
        (cgroup_root / "system.slice/memory.max").write_text("max\n")
        if swap:
            (cgroup_root / "system.slice/memory.swap.max").write_text("max\n")
    else:
        (cgroup_root / "memory").mkdir(parents=True)
        if swap:
            (cgroup_root / "memory/memory.memsw.limit_in_bytes").write_text("0\n")
        if hugetlb:
            (cgroup_root / "hugetlb").mkdir()
    return sys_root, cgroup_root


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_resources_a_host_cannot_honour_are_refused_naming_the_hosts_limit(tmp_path: Path, v2: bool) -> None:
    sys_root, cgroup_root = _fake_host(tmp_path, v2=v2, swap=False, hugetlb=False)

    def said(resources: dict[str, object]) -> str:
        with pytest.raises(InvalidArgument) as err:
            spec.check_resources_on_host(resources, sys_root, cgroup_root)
        return str(err.value)

    assert "this host has CPUs 0-3" in said({"cpu": {"cpus": "4"}})
    assert "no hugetlb cgroup controller (its huge page sizes: 2MB)" in said(
        {"hugepageLimits": [{"pageSize": "2MB", "limit": 1}]}
    )
    assert "memory_swap_limit_in_bytes 536870912: this host has no swap accounting" in said(
        {"memory": {"limit": 1 << 28, "swap": 1 << 29}}
    )
    # "No swap beyond memory" (kubelet's v1 default) and unlimited swap need no accounting.
    spec.check_resources_on_host({"memory": {"limit": 1 << 28, "swap": 1 << 28}}, sys_root, cgroup_root)
    spec.check_resources_on_host({"memory": {"limit": 1 << 28, "swap": -1}}, sys_root, cgroup_root)
    if v2:
        assert "no hugetlb cgroup v2 controller (it has cpu memory pids)" in said(
            {"unified": {"hugetlb.2MB.max": "1"}}
        )
        assert "is not a cgroup v2 file name" in said({"unified": {"memoryhigh": "1"}})
        assert "is not a cgroup v2 file name" in said({"unified": {"../memory.max": "1"}})
        spec.check_resources_on_host({"unified": {"memory.high": "1"}}, sys_root, cgroup_root)
    else:
        assert "cgroup v2 settings need a cgroup v2 host" in said({"unified": {"memory.high": "1"}})


def test_huge_page_sizes_are_checked_against_the_hosts_pools(tmp_path: Path) -> None:
    sys_root, cgroup_root = _fake_host(tmp_path, v2=True, swap=True, hugetlb=True)
    spec.check_resources_on_host({"hugepageLimits": [{"pageSize": "2MB", "limit": 1}]}, sys_root, cgroup_root)
    with pytest.raises(InvalidArgument, match=r"no 1GB huge pages \(its huge page sizes: 2MB\)"):
        spec.check_resources_on_host(
            {"hugepageLimits": [{"pageSize": "1GB", "limit": 1}]}, sys_root, cgroup_root
        )
    spec.check_resources_on_host({"memory": {"limit": 1 << 28, "swap": 1 << 29}}, sys_root, cgroup_root)
