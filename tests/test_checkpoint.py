"""CheckpointContainer and restore from a checkpoint archive, against a real daemon on this host.

This host's kernel is one Debian's CRIU cannot initialise on, so here a checkpoint must answer
FailedPrecondition with CRIU's own words and leave nothing; the location rules and the refusal of
hostile or foreign restore archives are checked before CRIU is needed. The full checkpoint ->
restore round trip runs in the VM guest (vm/guest_checkpoint.py).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.runtime import checkpoint
from imageservice.commit import pack_upper_plain
from imageservice.platform import host_platform
from tests.support.pods import Env, daemon_env, exec_out

pytestmark = pytest.mark.root

RUNTIME = "runc"  # crun as Debian builds it has no CRIU support


@pytest.fixture
def env(daemon_factory, pod_image: str, tmp_path: Path) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    yield from runc_checkpoint_env(daemon_factory, pod_image, tmp_path)


def runc_checkpoint_env(daemon_factory, pod_image: str, tmp_path: Path) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    """A runc daemon whose checkpoint directory is ``tmp_path/checkpoints``; afterwards the host
    holds nothing of it."""
    bridge = f"pyt{secrets.token_hex(3)}"
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    (tmp_path / "checkpoints").mkdir()
    daemon = daemon_factory(
        f'default_runtime = "{RUNTIME}"\ncheckpoint_dir = "{tmp_path / "checkpoints"}"\n'
        f'[network]\nconf_dir = "{net_dir}"\npod_subnet = "198.18.110.0/24"\nbridge = "{bridge}"\n',
        name="checkpoint",
    )
    yield from daemon_env(daemon, pod_image, tmp_path / "logs", "198.18.110.", bridge)


def _checkpoint(env: Env, cid: str, location: str, timeout: int = 60) -> None:
    request = pb.CheckpointContainerRequest(container_id=cid, location=location, timeout=timeout)
    env.cri.runtime.CheckpointContainer(request, timeout=timeout + 10)


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _running(env: Env, cid: str) -> bool:
    state = env.cri.container_status(cid).status.state
    return (
        state == pb.ContainerState.CONTAINER_RUNNING and exec_out(env.cri, cid, "echo", "alive") == "alive\n"
    )


def test_checkpoint_where_criu_cannot_run_answers_failed_precondition_with_criu_reason(
    env: Env, tmp_path: Path
) -> None:
    status = checkpoint.criu_status()
    if status.available:
        pytest.skip("criu works on this host: the VM guest test covers the round trip")
    pod = env.pod("ckpt")
    cid = env.run(
        pod, "counter", ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.2; done"]
    )
    location = tmp_path / "checkpoints" / "counter.tar"

    err = _refused(lambda: _checkpoint(env, cid, str(location)))

    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert details.startswith("checkpointing is not available on this node: ")
    if "not installed" in status.reason:
        assert "apt-get install criu" in details
    else:
        # CRIU's own words, e.g. "vdso: Failed to fill self vdso symtable" on a 6.18 kernel.
        assert "criu check says: " in details and "Error (" in details
    assert not location.exists()
    assert os.listdir(tmp_path / "checkpoints") == []
    assert _running(env, cid)


def test_checkpoint_location_must_be_new_absolute_and_inside_the_checkpoint_dir(
    env: Env, tmp_path: Path
) -> None:
    allowed = tmp_path / "checkpoints"
    pod = env.pod("where")
    cid = env.run(pod, "sleeper", ["sleep", "1000"])
    (allowed / "taken.tar").write_text("someone else's")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    cases = {
        "relative.tar": (grpc.StatusCode.INVALID_ARGUMENT, "must be an absolute path"),
        "": (grpc.StatusCode.INVALID_ARGUMENT, "location is empty"),
        str(outside / "a.tar"): (grpc.StatusCode.INVALID_ARGUMENT, "outside the checkpoint directory"),
        str(allowed / ".." / "elsewhere" / "b.tar"): (
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside the checkpoint directory",
        ),
        str(allowed / "escape" / "c.tar"): (
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside the checkpoint directory",
        ),
        str(allowed / "missing" / "d.tar"): (grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
        str(allowed / "taken.tar"): (grpc.StatusCode.ALREADY_EXISTS, "exists already"),
    }
    for location, (code, words) in cases.items():
        err = _refused(lambda location=location: _checkpoint(env, cid, location))  # type: ignore[misc]
        assert (err.code(), words in (err.details() or "")) == (code, True), (location, err.details())
    unknown = _refused(lambda: _checkpoint(env, "f" * 64, str(allowed / "e.tar")))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert (allowed / "taken.tar").read_text() == "someone else's"
    assert sorted(os.listdir(allowed)) == ["escape", "taken.tar"]
    assert os.listdir(outside) == []
    assert _running(env, cid)


# --- restore from hostile or foreign archives ------------------------------------------------


def _member(
    tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **extra: object
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in extra.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _layer(entries: list[tuple[str, bytes]], link: tuple[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        if link:
            _member(tar, link[0], kind=tarfile.SYMTYPE, linkname=link[1])
        for name, data in entries:
            _member(tar, name, data)
    return out.getvalue()


def _archive(
    path: Path,
    image_id: str,
    *,
    architecture: str | None = None,
    extra: Callable[[tarfile.TarFile], None] | None = None,
    rootfs_diff: bytes | None = None,
    spec: bool = True,
) -> Path:
    """A checkpoint archive as CRI-O and pycri write them (CRIU images faked: nothing reaches CRIU)."""
    config = {
        "id": "0" * 64,
        "name": "counter",
        "rootfsImage": image_id,
        "rootfsImageRef": image_id,
        "rootfsImageName": "test/pods:1",
        "OCIRuntime": RUNTIME,
        "architecture": architecture or host_platform().architecture,
    }
    with tarfile.open(path, mode="w") as tar:
        _member(tar, checkpoint.CONFIG_DUMP, json.dumps(config).encode())
        if spec:
            _member(tar, checkpoint.SPEC_DUMP, b'{"ociVersion": "1.0.2"}')
        _member(tar, "checkpoint", kind=tarfile.DIRTYPE)
        _member(tar, "checkpoint/inventory.img", b"\x00" * 16)
        _member(tar, checkpoint.ROOTFS_DIFF_TAR, rootfs_diff or _layer([("kept/file", b"written before\n")]))
        if extra:
            extra(tar)
    return path


def _nothing_made(env: Env, planted: list[Path]) -> None:
    assert env.cri.list_containers() == []
    assert os.listdir(env.daemon.root / "containers") == []
    assert os.listdir(env.daemon.state / "containers") == []
    for path in planted:
        assert not os.path.lexists(path), path


def test_restore_from_hostile_corrupt_or_foreign_archives_is_refused_with_nothing_made(
    env: Env, tmp_path: Path
) -> None:
    pod = env.pod("restore")
    image_id = env.cri.image_status(env.image).image.id
    victim = tmp_path / "victim"
    arch = host_platform().architecture
    other_arch = "s390x" if arch != "s390x" else "amd64"
    archives = {
        "climbing member": (
            _archive(tmp_path / "a1.tar", image_id, extra=lambda t: _member(t, "../victim", b"x")),
            "not allowed",
        ),
        "absolute member": (
            _archive(tmp_path / "a2.tar", image_id, extra=lambda t: _member(t, str(victim), b"x")),
            "not allowed",
        ),
        "symlink member": (
            _archive(
                tmp_path / "a3.tar",
                image_id,
                extra=lambda t: _member(t, "checkpoint/link", kind=tarfile.SYMTYPE, linkname=str(victim)),
            ),
            "not a plain file or directory",
        ),
        "device member": (
            _archive(
                tmp_path / "a4.tar",
                image_id,
                extra=lambda t: _member(t, "checkpoint/mem", kind=tarfile.CHRTYPE, devmajor=1, devminor=1),
            ),
            "not a plain file or directory",
        ),
        "rootfs diff climbing": (
            _archive(tmp_path / "a5.tar", image_id, rootfs_diff=_layer([("../../victim", b"x")])),
            "rootfs-diff.tar",
        ),
        "another architecture": (
            _archive(tmp_path / "a7.tar", image_id, architecture=other_arch),
            f"was made on {other_arch}; this node is {arch}",
        ),
        "no spec.dump": (_archive(tmp_path / "a8.tar", image_id, spec=False), "has no spec.dump"),
    }
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive at all\n" * 40)
    archives["garbage"] = (garbage, "not a readable tar")

    for what, (archive, words) in archives.items():
        err = _refused(lambda archive=archive: env.cri.create_container(pod, "restored", str(archive)))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.code(), err.details())
        assert words in (err.details() or ""), (what, err.details())
        _nothing_made(env, [victim, tmp_path / "out" / "victim"])
    # The daemon is unaffected: an ordinary container still runs.
    cid = env.run(pod, "after", ["sleep", "1000"])
    assert _running(env, cid)


def test_restore_from_a_sound_archive_where_criu_cannot_run_is_refused_with_nothing_made(
    env: Env, tmp_path: Path
) -> None:
    status = checkpoint.criu_status()
    if status.available:
        pytest.skip("criu works on this host: the VM guest test covers the round trip")
    pod = env.pod("restore")
    image_id = env.cri.image_status(env.image).image.id
    # A layer symlink pointing out of the container is contained by the layer unpacker (the write
    # lands inside the layer, as in an image), never on the host.
    archive = _archive(
        tmp_path / "sound.tar",
        image_id,
        rootfs_diff=_layer([("out/victim", b"x")], link=("out", str(tmp_path))),
    )

    err = _refused(lambda: env.cri.create_container(pod, "restored", str(archive)))

    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "checkpointing is not available on this node" in (err.details() or "")
    _nothing_made(env, [tmp_path / "victim"])


def test_rootfs_diff_keeps_files_and_whiteouts_through_archive_and_restore_unpack(tmp_path: Path) -> None:
    """The writable layer as a checkpoint writes it (``.wh.`` entries, deleted.files) comes back as
    an overlay upper directory (whiteouts as 0/0 character devices) on restore."""
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "written").write_text("kept\n")
    os.mknod(upper / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # overlay whiteout
    members = tmp_path / "members"
    (members / "checkpoint").mkdir(parents=True)
    pack_upper_plain(upper, members / checkpoint.ROOTFS_DIFF_TAR)
    with tarfile.open(members / checkpoint.ROOTFS_DIFF_TAR) as tar:
        assert sorted(tar.getnames()) == ["etc", "etc/.wh.gone", "etc/written"]
    assert checkpoint._deleted_files(upper) == ["/etc/gone"]
    (members / checkpoint.CONFIG_DUMP).write_text(json.dumps({"rootfsImageRef": "sha256:" + "a" * 64}))
    (members / checkpoint.SPEC_DUMP).write_text("{}")
    archive = tmp_path / "archive.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(members.iterdir()):
            tar.add(entry, arcname=entry.name)

    source = checkpoint.open_archive(archive, tmp_path / "restore")

    assert source.image == "sha256:" + "a" * 64
    assert (source.upper / "etc" / "written").read_text() == "kept\n"
    gone = os.lstat(source.upper / "etc" / "gone")
    assert (gone.st_mode & 0o170000) == 0o020000 and gone.st_rdev == 0
    assert source.images.is_dir()
