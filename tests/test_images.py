"""ImageService end to end: a real pycri daemon pulling from a real docker-registry on 127.0.0.1."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from imageservice.store import chain_ids
from tests.support.daemon import Daemon
from tests.support.images import (
    HOST_ARCH,
    MULTILAYER_EXPECTED,
    Image,
    busybox_image,
    busybox_layer,
    hostile_layer,
    layer_from_files,
    multilayer_image,
    push_image,
    push_index,
    random_layer,
    user_image,
)
from tests.support.registry import Registry, start_registry
from tests.support.wait import wait_for

pytestmark = pytest.mark.root

OTHER_ARCH = "s390x" if HOST_ARCH != "s390x" else "amd64"


def layer_dirs(daemon: Daemon) -> set[str]:
    return {p.name for p in (daemon.root / "layers").iterdir()}


def leftovers(daemon: Daemon) -> list[str]:
    return [p.name for p in (daemon.root / "tmp").iterdir()]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


@pytest.fixture
def merged(daemon: Daemon) -> Iterator[object]:
    """Mount an image's layers as a read-only overlay, as a container's rootfs would see them."""
    mounts: list[Path] = []

    def mount(image_id: str) -> Path:
        record = json.loads(CRIClient(daemon.endpoint).image_status(image_id, verbose=True).info["info"])
        lowers = [
            str(daemon.root / "layers" / c.removeprefix("sha256:") / "diff") for c in record["chainIDs"]
        ]
        target = daemon.workdir / f"merged-{len(mounts)}"
        target.mkdir()
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                "ro,lowerdir=" + ":".join(reversed(lowers)),
                str(target),
            ],
            check=True,
        )
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", str(target)], check=True)


def test_pull_multilayer_image_gives_the_merged_rootfs(
    registry: Registry, daemon: Daemon, cri: CRIClient, merged
) -> None:  # type: ignore[no-untyped-def]
    image = multilayer_image()
    digest = push_image(registry, "test/multilayer", "v1", image)
    ref = f"{registry.host}/test/multilayer:v1"
    image_id = cri.pull(ref)
    assert image_id == image.config_digest

    status = cri.image_status(ref).image
    assert status.id == image_id
    assert list(status.repo_tags) == [ref]
    assert list(status.repo_digests) == [f"{registry.host}/test/multilayer@{digest}"]
    assert status.uid.value == 1002 and status.username == ""
    assert status.size >= sum(layer.size for layer in image.layers)

    root = merged(image_id)
    for name, content in MULTILAYER_EXPECTED["files"].items():
        assert (root / name).read_bytes() == content, name
    for name in MULTILAYER_EXPECTED["absent"]:
        assert not os.path.lexists(root / name), name
    for name, target in MULTILAYER_EXPECTED["symlinks"].items():
        assert os.readlink(root / name) == target
    assert sorted(os.listdir(root / "data/old")) == ["new.txt"]
    suid = os.stat(root / "usr/local/bin/suid-tool")
    assert suid.st_mode & stat.S_ISUID and stat.S_IMODE(suid.st_mode) == 0o4755
    owned = os.stat(root / "home/app/owned.txt")
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1002, 1002, 0o600)
    assert os.stat(root / "etc/app.conf").st_ino == os.stat(root / "data/hardlink-to-conf").st_ino
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    # The whiteout and the opaque marker are overlay's own: a device 0:0 and an xattr.
    top = (
        daemon.root
        / "layers"
        / chain_ids([layer.diff_id for layer in image.layers])[-1].removeprefix("sha256:")
    )
    whiteout = os.lstat(top / "diff/etc/removed")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(top / "diff/data/old", "trusted.overlay.opaque") == b"y"


@pytest.mark.parametrize(("fmt", "compression"), [("docker", "gzip"), ("oci", "zstd"), ("oci", "none")])
def test_pull_accepts_docker_and_oci_manifests_and_every_compression(
    registry: Registry, cri: CRIClient, fmt: str, compression: str
) -> None:
    image = multilayer_image(compression)  # type: ignore[arg-type]
    push_image(registry, f"test/fmt-{fmt}-{compression}", "1", image, fmt=fmt)  # type: ignore[arg-type]
    assert cri.pull(f"{registry.host}/test/fmt-{fmt}-{compression}:1") == image.config_digest


def test_shared_base_layer_is_stored_once(registry: Registry, daemon: Daemon, cri: CRIClient) -> None:
    first = Image.build([busybox_layer(), layer_from_files([("a.txt", "a\n")])], cmd=["sh"])
    second = Image.build([busybox_layer(), layer_from_files([("b.txt", "b\n")])], cmd=["sh"])
    push_image(registry, "test/share-a", "1", first)
    push_image(registry, "test/share-b", "1", second)
    cri.pull(f"{registry.host}/test/share-a:1")
    assert len(layer_dirs(daemon)) == 2
    cri.pull(f"{registry.host}/test/share-b:1")
    # busybox once, plus one top layer per image.
    assert len(layer_dirs(daemon)) == 3
    base = busybox_layer().diff_id.removeprefix("sha256:")
    assert base in layer_dirs(daemon)
    # Removing one image keeps the shared base for the other.
    cri.remove_image(f"{registry.host}/test/share-a:1")
    assert base in layer_dirs(daemon) and len(layer_dirs(daemon)) == 2
    cri.remove_image(f"{registry.host}/test/share-b:1")
    assert layer_dirs(daemon) == set()


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_index_pull_picks_this_hosts_platform(registry: Registry, cri: CRIClient, fmt: str) -> None:
    here = busybox_image(cmd=["echo", HOST_ARCH])
    there = busybox_image(cmd=["echo", OTHER_ARCH])
    index_digest = push_index(
        registry,
        f"test/multiarch-{fmt}",
        "1",
        [
            (there, {"os": "linux", "architecture": OTHER_ARCH}),
            (here, {"os": "linux", "architecture": HOST_ARCH}),
        ],
        fmt=fmt,  # type: ignore[arg-type]
    )
    ref = f"{registry.host}/test/multiarch-{fmt}:1"
    image_id = cri.pull(ref)
    config = json.loads(cri.image_status(ref, verbose=True).info["info"])["imageSpec"]
    assert config["architecture"] == HOST_ARCH and config["config"]["Cmd"] == ["echo", HOST_ARCH]
    # The repo digest is the index's, as kubelet and containerd report it.
    assert list(cri.image_status(image_id).image.repo_digests) == [
        f"{registry.host}/test/multiarch-{fmt}@{index_digest}"
    ]


def test_index_without_this_platform_is_not_found_naming_what_exists(
    registry: Registry, cri: CRIClient
) -> None:
    push_index(
        registry,
        "test/foreign",
        "1",
        [(busybox_image(), {"os": "linux", "architecture": OTHER_ARCH})],
    )
    err = rpc_error(cri.pull, f"{registry.host}/test/foreign:1")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert f"linux/{OTHER_ARCH}" in (err.details() or "")


@pytest.mark.parametrize(
    ("user", "uid", "username"), [("1002", 1002, ""), ("www-data", None, "www-data"), ("1003:grp", 1003, "")]
)
def test_image_status_reports_the_images_user(
    registry: Registry, cri: CRIClient, user: str, uid: int | None, username: str
) -> None:
    tag = user.replace(":", "-")
    push_image(registry, "test/users", tag, user_image(user))
    cri.pull(f"{registry.host}/test/users:{tag}")
    image = cri.image_status(f"{registry.host}/test/users:{tag}").image
    assert image.username == username
    if uid is None:
        assert not image.HasField("uid")
    else:
        assert image.uid.value == uid


def test_image_status_of_a_missing_image_is_empty_not_an_error(cri: CRIClient) -> None:
    response = cri.image_status("127.0.0.1:1/not/there:1")
    assert not response.HasField("image")


def test_one_image_id_across_names_and_lookups(registry: Registry, cri: CRIClient) -> None:
    image = busybox_image(cmd=["echo", "same"])
    digest = push_image(registry, "test/same-a", "1", image)
    push_image(registry, "test/same-b", "2", image)
    first = cri.pull(f"{registry.host}/test/same-a:1")
    second = cri.pull(f"{registry.host}/test/same-b:2")
    assert first == second == image.config_digest
    ids = {img.id for img in cri.list_images()}
    assert ids == {first}
    status = cri.image_status(first).image
    assert sorted(status.repo_tags) == sorted(
        [f"{registry.host}/test/same-a:1", f"{registry.host}/test/same-b:2"]
    )
    for lookup in (
        first,
        first.removeprefix("sha256:"),
        first.removeprefix("sha256:")[:12],
        f"{registry.host}/test/same-a@{digest}",
        f"{registry.host}/test/same-b:2",
    ):
        assert cri.image_status(lookup).image.id == first, lookup
    assert [i.id for i in cri.list_images(f"{registry.host}/test/same-b:2")] == [first]
    assert cri.list_images("127.0.0.1:1/none:1") == []


def test_remove_image_by_tag_removes_every_tag_and_is_idempotent(
    registry: Registry, daemon: Daemon, cri: CRIClient
) -> None:
    image = busybox_image(cmd=["echo", "rm"])
    push_image(registry, "test/rm-a", "1", image)
    push_image(registry, "test/rm-b", "1", image)
    cri.pull(f"{registry.host}/test/rm-a:1")
    cri.pull(f"{registry.host}/test/rm-b:1")
    cri.remove_image(f"{registry.host}/test/rm-a:1")
    assert cri.list_images() == []
    assert not cri.image_status(f"{registry.host}/test/rm-b:1").HasField("image")
    assert layer_dirs(daemon) == set()
    cri.remove_image(f"{registry.host}/test/rm-a:1")  # again: not an error
    cri.remove_image(image.config_digest)


def test_remove_image_by_id_and_by_digest(registry: Registry, cri: CRIClient) -> None:
    image = busybox_image(cmd=["echo", "rm-id"])
    digest = push_image(registry, "test/rm-id", "1", image)
    image_id = cri.pull(f"{registry.host}/test/rm-id:1")
    cri.remove_image(image_id)
    assert cri.list_images() == []
    cri.pull(f"{registry.host}/test/rm-id:1")
    cri.remove_image(f"{registry.host}/test/rm-id@{digest}")
    assert cri.list_images() == []


def test_concurrent_removals_of_one_image_all_succeed(
    registry: Registry, daemon: Daemon, cri: CRIClient
) -> None:
    image = busybox_image(cmd=["echo", "race"])
    push_image(registry, "test/race", "1", image)
    image_id = cri.pull(f"{registry.host}/test/race:1")
    errors: list[BaseException] = []

    def remove(name: str) -> None:
        try:
            with CRIClient(daemon.endpoint) as client:
                client.remove_image(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=remove, args=(name,))
        for name in [image_id, f"{registry.host}/test/race:1"] * 4
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cri.list_images() == [] and layer_dirs(daemon) == set()


def test_concurrent_pulls_of_one_image_share_one_download(registry: Registry, daemon: Daemon) -> None:
    layer = random_layer(8 * 1024 * 1024, seed=7)
    image = Image.build([busybox_layer(), layer], cmd=["sh"])
    push_image(registry, "test/concurrent", "1", image)
    ids: list[str] = []
    log_before = registry.log_path.read_text() if registry.log_path else ""

    def pull() -> None:
        with CRIClient(daemon.endpoint) as client:
            ids.append(client.pull(f"{registry.host}/test/concurrent:1"))

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ids == [image.config_digest] * 4
    assert registry.log_path is not None
    new_log = registry.log_path.read_text()[len(log_before) :]
    blob_gets = [
        line for line in new_log.splitlines() if f"GET /v2/test/concurrent/blobs/{layer.digest}" in line
    ]
    assert len(blob_gets) == 1, blob_gets


def test_images_survive_a_daemon_restart(registry: Registry, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    image = multilayer_image()
    push_image(registry, "test/restart", "1", image)
    daemon = daemon_factory(name="restart")
    with daemon.client() as client:
        client.pull(f"{registry.host}/test/restart:1")
        before = client.image_status(image.config_digest).image
    daemon.stop()
    daemon.start()
    with daemon.client() as client:
        after = client.image_status(f"{registry.host}/test/restart:1").image
    assert after == before


def test_image_fs_info_counts_the_store(registry: Registry, daemon: Daemon, cri: CRIClient) -> None:
    empty = cri.image_fs_info().image_filesystems[0]
    push_image(registry, "test/fsinfo", "1", multilayer_image())
    cri.pull(f"{registry.host}/test/fsinfo:1")
    usage = cri.image_fs_info().image_filesystems[0]
    assert usage.fs_id.mountpoint.startswith(str(daemon.root))
    assert usage.used_bytes.value > empty.used_bytes.value + busybox_layer().size
    assert usage.inodes_used.value > empty.inodes_used.value + 10
    assert usage.timestamp > 0


def test_image_fs_info_matches_du_of_the_store(registry: Registry, daemon: Daemon, cri: CRIClient) -> None:
    push_image(registry, "test/fsinfo-du", "1", multilayer_image())
    push_image(registry, "test/fsinfo-du", "2", Image.build([busybox_layer()], cmd=["sh"]))
    cri.pull(f"{registry.host}/test/fsinfo-du:1")
    cri.pull(f"{registry.host}/test/fsinfo-du:2")
    usage = cri.image_fs_info().image_filesystems[0]
    layers = daemon.root / "layers"
    assert usage.fs_id.mountpoint == str(layers)
    du_bytes = int(
        subprocess.run(["du", "-s", "-B1", str(layers)], capture_output=True, text=True).stdout.split()[0]
    )
    du_inodes = int(
        subprocess.run(["du", "-s", "--inodes", str(layers)], capture_output=True, text=True).stdout.split()[
            0
        ]
    )
    assert abs(usage.used_bytes.value - du_bytes) <= du_bytes * 0.01, (usage.used_bytes.value, du_bytes)
    assert usage.inodes_used.value == du_inodes
    cri.remove_image(f"{registry.host}/test/fsinfo-du:1")
    cri.remove_image(f"{registry.host}/test/fsinfo-du:2")
    du_empty = int(
        subprocess.run(["du", "-s", "-B1", str(layers)], capture_output=True, text=True).stdout.split()[0]
    )
    assert cri.image_fs_info().image_filesystems[0].used_bytes.value == du_empty


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "UPPER/case", "a b", "x@sha256:123"])
def test_malformed_reference_is_invalid_argument(cri: CRIClient, name: str) -> None:
    err = rpc_error(cri.pull, name)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_tag_and_missing_repository_are_not_found(registry: Registry, cri: CRIClient) -> None:
    push_image(registry, "test/present", "1", busybox_image())
    for ref in (f"{registry.host}/test/present:nope", f"{registry.host}/test/absent:1"):
        err = rpc_error(cri.pull, ref)
        assert err.code() == grpc.StatusCode.NOT_FOUND, ref
        assert registry.host in (err.details() or "")


def test_unreachable_registry_is_unavailable_naming_it(cri: CRIClient) -> None:
    err = rpc_error(cri.pull, "127.0.0.1:1/x/y:1")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:1" in (err.details() or "")


@pytest.mark.parametrize("kind", ["abs_path", "dotdot", "dotdot_nested", "symlink_escape", "hardlink_escape"])
def test_hostile_layer_is_refused_and_nothing_is_stored(
    registry: Registry, daemon: Daemon, cri: CRIClient, kind: str
) -> None:
    evil = hostile_layer(kind)  # type: ignore[arg-type]
    image = Image.build([busybox_layer(), evil], cmd=["sh"])
    push_image(registry, f"test/hostile-{kind.replace('_', '-')}", "1", image)
    err = rpc_error(cri.pull, f"{registry.host}/test/hostile-{kind.replace('_', '-')}:1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert evil.digest in (err.details() or "")
    assert cri.list_images() == []
    assert wait_for(lambda: layer_dirs(daemon) == set() and leftovers(daemon) == [])
    for escaped in (
        "/evil",
        "/tmp/evil",
        "/etc/evil-abs",
        str(daemon.root / "evil"),
        str(daemon.root.parent / "evil"),
    ):
        assert not os.path.exists(escaped), escaped
    # The daemon keeps serving.
    assert cri.version().runtime_name == "pycri"


def test_config_that_lies_about_diff_ids_fails_and_stores_nothing(
    registry: Registry, daemon: Daemon, cri: CRIClient
) -> None:
    image = busybox_image()
    image.config["rootfs"] = {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}
    push_image(registry, "test/liar", "1", image)
    err = rpc_error(cri.pull, f"{registry.host}/test/liar:1")
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert busybox_layer().digest in (err.details() or "")
    assert cri.list_images() == [] and wait_for(lambda: layer_dirs(daemon) == set())


def test_tiny_deadline_gives_deadline_exceeded_and_leaves_nothing(
    registry: Registry, daemon: Daemon, cri: CRIClient
) -> None:
    image = Image.build([busybox_layer(), random_layer(16 * 1024 * 1024, seed=3)], cmd=["sh"])
    push_image(registry, "test/deadline", "1", image)
    err = rpc_error(cri.pull, f"{registry.host}/test/deadline:1", timeout=0.001)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: layer_dirs(daemon) == set() and leftovers(daemon) == [])
    assert cri.list_images() == []
    # And a patient pull then works.
    assert cri.pull(f"{registry.host}/test/deadline:1") == image.config_digest


# --- auth and mirrors ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("basic"), auth="basic")
    push_image(reg, "private/app", "1", busybox_image(cmd=["echo", "basic"]))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("token"), auth="token")
    push_image(reg, "private/app", "1", busybox_image(cmd=["echo", "token"]))
    yield reg
    reg.stop()


def test_basic_auth_registry_needs_credentials(basic_registry: Registry, cri: CRIClient) -> None:
    ref = f"{basic_registry.host}/private/app:1"
    err = rpc_error(cri.pull, ref)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert basic_registry.host in (err.details() or "")
    err = rpc_error(cri.pull, ref, username="pycri", password="wrong")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert cri.pull(ref, username=basic_registry.username or "", password=basic_registry.password or "")
    image_id = cri.pull(ref, auth=pb.AuthConfig(auth="cHljcmk6czNjcmV0"))  # base64("pycri:s3cret")
    assert cri.image_status(ref).image.id == image_id


def test_token_registry_runs_the_bearer_flow(token_registry: Registry, cri: CRIClient) -> None:
    assert token_registry.token_server is not None
    before = token_registry.token_server.tokens_issued
    ref = f"{token_registry.host}/private/app:1"
    err = rpc_error(cri.pull, ref)
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    cri.pull(ref, username=token_registry.username or "", password=token_registry.password or "")
    assert token_registry.token_server.tokens_issued > before


def test_credentials_from_the_config_file(basic_registry: Registry, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(
        f'[registries."{basic_registry.host}"]\nusername = "pycri"\npassword = "s3cret"\n', name="creds"
    )
    with daemon.client() as client:
        assert client.pull(f"{basic_registry.host}/private/app:1")


def test_mirror_serves_a_registry_under_its_own_name(registry: Registry, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    image = busybox_image(cmd=["echo", "pause"])
    push_image(registry, "pause", "3.9", image)
    daemon = daemon_factory(
        '[registries."registry.k8s.io"]\n'
        f'mirrors = ["http://127.0.0.1:1", "{registry.url}"]\nmirrors_only = true\n',
        name="mirror",
    )
    with daemon.client() as client:
        assert client.pull("registry.k8s.io/pause:3.9") == image.config_digest
        status = client.image_status("registry.k8s.io/pause:3.9").image
        assert list(status.repo_tags) == ["registry.k8s.io/pause:3.9"]
        assert status.repo_digests[0].startswith("registry.k8s.io/pause@sha256:")
        # mirrors_only: a repository the mirror lacks is not looked for upstream.
        err = rpc_error(client.pull, "registry.k8s.io/absent:1")
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_configured_pinned_images_are_reported_pinned(registry: Registry, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    push_image(registry, "test/pinned", "1", busybox_image(cmd=["echo", "pinned"]))
    push_image(registry, "test/unpinned", "1", busybox_image(cmd=["echo", "unpinned"]))
    daemon = daemon_factory(f'[image]\npinned_images = ["{registry.host}/test/pinned:1"]\n', name="pins")
    with daemon.client() as client:
        client.pull(f"{registry.host}/test/pinned:1")
        client.pull(f"{registry.host}/test/unpinned:1")
        assert client.image_status(f"{registry.host}/test/pinned:1").image.pinned is True
        assert client.image_status(f"{registry.host}/test/unpinned:1").image.pinned is False


def test_digest_lookup_does_not_match_another_repository(registry: Registry, cri: CRIClient) -> None:
    image = busybox_image(cmd=["echo", "mine"])
    digest = push_image(registry, "test/mine", "1", image)
    cri.pull(f"{registry.host}/test/mine:1")
    assert cri.image_status(f"{registry.host}/test/mine@{digest}").image.id == image.config_digest
    assert not cri.image_status(f"{registry.host}/test/someone-else@{digest}").HasField("image")
    cri.remove_image(f"{registry.host}/test/someone-else@{digest}")  # names nothing: removes nothing
    assert [i.id for i in cri.list_images()] == [image.config_digest]


def test_single_manifest_for_another_platform_is_refused(
    registry: Registry, daemon: Daemon, cri: CRIClient
) -> None:
    foreign = busybox_image(cmd=["echo", "foreign"]).with_platform(
        {"os": "linux", "architecture": OTHER_ARCH}
    )
    push_image(registry, "test/foreign-single", "1", foreign)
    err = rpc_error(cri.pull, f"{registry.host}/test/foreign-single:1")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"linux/{OTHER_ARCH}" in (err.details() or "")
    assert cri.list_images() == [] and wait_for(lambda: layer_dirs(daemon) == set())


def test_tag_and_digest_together_record_only_the_digest(registry: Registry, cri: CRIClient) -> None:
    image = busybox_image(cmd=["echo", "both"])
    digest = push_image(registry, "test/both", "1", image)
    cri.pull(f"{registry.host}/test/both:1@{digest}")
    status = cri.image_status(image.config_digest).image
    assert list(status.repo_tags) == []
    assert list(status.repo_digests) == [f"{registry.host}/test/both@{digest}"]
