"""``pycri commit`` and ``pycri image tag``: a container's changes become an image in the same
store, stacked on its image's layers, runnable at once through CRI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import grpc
import pytest

from cri_runtime.errors import InvalidArgument
from cri_runtime.host import mounts
from imageservice.commit import apply_changes, commit_config
from imageservice.packer import pack_upper
from imageservice.unpack import unpack_layer
from tests.support.pods import Env, container_pid, exec_out, wait_exited

pytestmark = pytest.mark.root

# Runs in the container: a new file, a deleted lower file (whiteout), a lower directory
# replaced (opaque), a hard link, a device node, a sparse file.
CHANGES = (
    "set -e; mkdir -p /new; echo committed > /new/file; rm /usr/bin/env; "
    "rm -rf /www; mkdir /www; echo fresh > /www/only; "
    "echo linked > /hl1; ln /hl1 /hl2; mknod /mydev c 1 3; "
    "dd if=/dev/zero of=/sparse bs=1 count=1 seek=4194304 2>/dev/null; "
    "touch /ready; sleep 1000"
)


def pycri(env: Env, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cri_runtime.daemon.cli", *args, "--socket", str(env.daemon.socket)],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
        check=False,
    )


def _ready(env: Env, cid: str) -> None:
    for _ in range(200):
        if env.cri.exec_sync(cid, ["test", "-e", "/ready"], timeout=5).exit_code == 0:
            return
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError("the container did not make its changes")


def _layer_dirs(env: Env) -> set[str]:
    return {p.name for p in (env.daemon.root / "layers").iterdir()}


def test_commit_of_a_running_container_keeps_whiteouts_opaque_dirs_links_devices_xattrs(env: Env) -> None:
    pod = env.pod("commit")
    cid = env.run(pod, "changer", ["sh", "-c", CHANGES])
    _ready(env, cid)
    # An xattr set through the container's root goes to its upper directory, as a program's would.
    os.setxattr(f"/proc/{container_pid(env.cri, cid)}/root/new/file", "user.pycri", b"kept\xff")
    parent = env.cri.image_status(env.image).image
    layers_before = _layer_dirs(env)

    result = pycri(
        env,
        "commit",
        "--pause",
        "--change",
        'CMD ["cat", "/new/file"]',
        "--change",
        "ENV COMMITTED=yes",
        "--change",
        "LABEL stage=test",
        "--change",
        "EXPOSE 8080",
        "-m",
        "test commit",
        cid,
        "committed/changer:v1",
    )
    assert result.returncode == 0, result.stderr
    image_id = result.stdout.split()[0]
    # Frozen while read (the daemon says which cgroup), thawed after: the container still answers.
    frozen = [
        line for line in env.daemon.log_path.read_text().splitlines() if "container frozen for commit" in line
    ]
    assert len(frozen) == 1 and cid in frozen[0]
    cgroup_dir = json.loads(frozen[0])["cgroup"]
    state_file = Path(cgroup_dir) / ("freezer.state" if "/freezer/" in cgroup_dir else "cgroup.freeze")
    assert state_file.read_text().strip() in ("THAWED", "0")
    assert exec_out(env.cri, cid, "echo", "alive") == "alive\n"

    listed = {tag: image.id for image in env.cri.list_images() for tag in image.repo_tags}
    assert listed["docker.io/committed/changer:v1"] == image_id
    # Stacked, not copied: exactly one new layer directory.
    assert len(_layer_dirs(env) - layers_before) == 1
    record_config = json.loads(_image_config(env, image_id))
    assert record_config["config"]["Cmd"] == ["cat", "/new/file"]
    assert "COMMITTED=yes" in record_config["config"]["Env"]
    assert record_config["config"]["Labels"]["stage"] == "test"
    assert "8080/tcp" in record_config["config"]["ExposedPorts"]
    assert record_config["history"][-1]["comment"] == "test commit"
    parent_config = json.loads(_image_config(env, parent.id))
    diff_ids = record_config["rootfs"]["diff_ids"]
    assert (
        diff_ids[:-1] == parent_config["rootfs"]["diff_ids"]
        and len(diff_ids) == len(parent_config["rootfs"]["diff_ids"]) + 1
    )

    # A container of the committed image sees the changes.
    run = env.cri.create_container(pod, "fromcommit", "committed/changer:v1", log_path="fromcommit.log")
    env.cri.start_container(run)
    assert wait_exited(env.cri, run).exit_code == 0
    assert (env.logs / "commit" / "fromcommit.log").read_text().endswith("committed\n")
    check = env.cri.create_container(
        pod, "checker", "committed/changer:v1", command=["sleep", "1000"], log_path="checker.log"
    )
    env.cri.start_container(check)
    assert exec_out(env.cri, check, "cat", "/new/file") == "committed\n"
    assert env.cri.exec_sync(check, ["test", "-e", "/usr/bin/env"]).exit_code == 1  # whiteout
    assert exec_out(env.cri, check, "ls", "-A", "/www") == "only\n"  # opaque: index.html gone
    inodes = exec_out(env.cri, check, "stat", "-c", "%i %h", "/hl1", "/hl2").split("\n")
    assert inodes[0] == inodes[1] and inodes[0].endswith(" 2")  # one file, two names
    assert exec_out(env.cri, check, "stat", "-c", "%F %t,%T", "/mydev") == "character special file 1,3\n"
    assert exec_out(env.cri, check, "stat", "-c", "%s", "/sparse") == "4194305\n"
    assert exec_out(env.cri, check, "sh", "-c", "echo $COMMITTED") == "yes\n"
    pid = container_pid(env.cri, check)
    assert os.getxattr(f"/proc/{pid}/root/new/file", "user.pycri") == b"kept\xff"
    assert env.cri.exec_sync(check, ["test", "-x", "/bin/busybox"]).exit_code == 0  # parent layers


def _image_config(env: Env, image_id: str) -> str:
    import sqlite3

    with sqlite3.connect(env.daemon.root / "pycri.db") as db:
        row = db.execute("SELECT config FROM images WHERE id = ?", (image_id,)).fetchone()
    assert row is not None, f"image {image_id} not recorded"
    return bytes(row[0]).decode()


def test_commit_of_an_exited_container_and_tag(env: Env) -> None:
    pod = env.pod("exited")
    cid = env.run(pod, "writer", ["sh", "-c", "echo after-exit > /note"])
    wait_exited(env.cri, cid)
    result = pycri(env, "commit", cid, "exited:1")
    assert result.returncode == 0, result.stderr
    image_id = result.stdout.split()[0]
    tagged = pycri(env, "image", "tag", "exited:1", "127.0.0.1:5999/other/name:2")
    assert tagged.returncode == 0, tagged.stderr
    image = env.cri.image_status("127.0.0.1:5999/other/name:2").image
    assert image.id == image_id
    assert set(image.repo_tags) == {"docker.io/library/exited:1", "127.0.0.1:5999/other/name:2"}
    check = env.cri.create_container(
        pod, "reader", "127.0.0.1:5999/other/name:2", command=["cat", "/note"], log_path="r.log"
    )
    env.cri.start_container(check)
    assert wait_exited(env.cri, check).exit_code == 0
    assert (env.logs / "exited" / "r.log").read_text().endswith("after-exit\n")


def test_commit_refusals_leave_no_image_layer_or_temporary_file(env: Env) -> None:
    pod = env.pod("bad")
    cid = env.run(pod, "c", ["sh", "-c", "echo x > /f; sleep 1000"])
    images_before = {i.id for i in env.cri.list_images()}
    layers_before = _layer_dirs(env)
    unknown = pycri(env, "commit", "0123456789abcdef", "x:1")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr, unknown.stderr
    bad_name = pycri(env, "commit", cid, "Not A Valid:ref")
    assert bad_name.returncode == 1 and "INVALID_ARGUMENT" in bad_name.stderr, bad_name.stderr
    digest_name = pycri(env, "commit", cid, "x@sha256:" + "a" * 64)
    assert digest_name.returncode == 1 and "INVALID_ARGUMENT" in digest_name.stderr
    bad_change = pycri(env, "commit", "--change", "RUN rm -rf /", cid, "x:1")
    assert bad_change.returncode == 1 and "INVALID_ARGUMENT" in bad_change.stderr
    assert "RUN is not one of" in bad_change.stderr
    env.cri.remove_container(cid)
    removed = pycri(env, "commit", cid, "x:1")
    assert removed.returncode == 1 and "NOT_FOUND" in removed.stderr
    bad_tag = pycri(env, "image", "tag", "no-such-image:1", "y:1")
    assert bad_tag.returncode == 1 and "NOT_FOUND" in bad_tag.stderr
    assert {i.id for i in env.cri.list_images()} == images_before
    assert _layer_dirs(env) == layers_before
    assert list((env.daemon.root / "tmp").iterdir()) == []


def test_commit_through_the_socket_reports_grpc_codes(env: Env) -> None:
    with grpc.insecure_channel(env.daemon.endpoint) as channel:
        call = channel.unary_unary(
            "/pycri.v1.Images/Commit",
            request_serializer=lambda d: json.dumps(d).encode(),
            response_deserializer=json.loads,
        )
        with pytest.raises(grpc.RpcError) as info:
            call({"container_id": "nope"}, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            call({"container_id": 5}, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- the packer and the config changes, without a daemon ------------------------------------


def test_pack_upper_turns_overlay_markers_into_oci_whiteouts(tmp_path: Path) -> None:
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for directory in (lower / "gone-dir", upper, work, merged):
        directory.mkdir(parents=True)
    (lower / "gone-dir" / "old").write_text("old")
    (lower / "deleted").write_text("x")
    mounts.mount_overlay([lower], upper, work, merged)
    try:
        (merged / "deleted").unlink()
        shutil.rmtree(merged / "gone-dir")
        (merged / "gone-dir").mkdir()  # recreated: overlayfs marks it opaque
        (merged / "gone-dir" / "new").write_text("new")
        (merged / "one").write_text("linked")
        os.link(merged / "one", merged / "two")
        os.setxattr(merged / "one", "user.k", b"v\x00\xff")
        os.mknod(merged / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    finally:
        mounts.unmount(merged)
    packed = pack_upper(upper, tmp_path / "layer.tar.gz")
    raw = gzip.decompress((tmp_path / "layer.tar.gz").read_bytes())
    assert packed.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert packed.digest == "sha256:" + hashlib.sha256((tmp_path / "layer.tar.gz").read_bytes()).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members[".wh.deleted"].isfile() and members[".wh.deleted"].size == 0
    assert "gone-dir/.wh..wh..opq" in members and "gone-dir/new" in members
    assert "gone-dir/old" not in members and "deleted" not in members
    assert members["two"].islnk() and members["two"].linkname == "one"
    assert (
        members["one"].pax_headers["SCHILY.xattr.user.k"].encode("utf-8", "surrogateescape") == b"v\x00\xff"
    )
    assert not any(
        k.startswith("SCHILY.xattr.trusted.overlay") for m in members.values() for k in m.pax_headers
    )
    assert members["null"].ischr() and (members["null"].devmajor, members["null"].devminor) == (1, 3)
    # The layer unpacks through the store's hostile-content path to what the container saw.
    dest = tmp_path / "unpacked"
    dest.mkdir()
    assert unpack_layer(tmp_path / "layer.tar.gz", dest, blob_digest=packed.digest).diff_id == packed.diff_id
    assert os.stat(dest / "one").st_ino == os.stat(dest / "two").st_ino
    assert os.getxattr(dest / "gone-dir", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(dest / "deleted").st_mode) and os.lstat(dest / "deleted").st_rdev == 0


def test_changes_edit_the_parent_config_and_refuse_what_they_do_not_know() -> None:
    parent = {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "WorkingDir": "/srv"}
    changed = apply_changes(
        parent,
        [
            "ENV A=2 B='two words'",
            "CMD echo hi",
            'ENTRYPOINT ["/bin/tini", "--"]',
            "WORKDIR app",
            "USER 1000:1000",
            "LABEL a=b c=d",
            "EXPOSE 80 53/udp",
        ],
    )
    assert changed["Env"] == ["PATH=/bin", "A=2", "B=two words"]
    assert changed["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert changed["Entrypoint"] == ["/bin/tini", "--"]
    assert changed["WorkingDir"] == "/srv/app" and changed["User"] == "1000:1000"
    assert changed["Labels"] == {"a": "b", "c": "d"}
    assert changed["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert parent["Env"] == ["PATH=/bin", "A=1"]  # the parent's config is not touched
    for bad in ("RUN rm -rf /", "CMD", 'CMD ["unclosed"', "EXPOSE 99999", "LABEL =x"):
        with pytest.raises(InvalidArgument):
            apply_changes(parent, [bad])
    config = json.loads(
        commit_config(
            {"config": parent, "rootfs": {"diff_ids": ["sha256:" + "a" * 64]}},
            "sha256:" + "b" * 64,
            [],
            comment="c",
        )
    )
    assert config["rootfs"]["diff_ids"] == ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
    assert config["history"][-1]["comment"] == "c"


def test_commit_of_100_mb_of_changes_costs_about_what_tar_does(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = env.pod("big")
    # Compressible and not: half text-like, half random, in 10 files.
    script = (
        "for i in 0 1 2 3 4; do head -c 10485760 /dev/urandom > /r$i; "
        "yes line-of-text | head -c 10485760 > /t$i; done; touch /ready; sleep 1000"
    )
    cid = env.run(pod, "writer", ["sh", "-c", script])
    for _ in range(600):
        if env.cri.exec_sync(cid, ["test", "-e", "/ready"], timeout=5).exit_code == 0:
            break
        subprocess.run(["sleep", "0.1"], check=True)
    upper = env.daemon.root / "containers" / cid / "upper"
    started = time.monotonic()
    subprocess.run(
        ["tar", "-czf", str(tmp_path / "ref.tar.gz"), "-C", str(upper), "."], check=True, timeout=300
    )
    subprocess.run(["sha256sum", str(tmp_path / "ref.tar.gz")], check=True, capture_output=True, timeout=60)
    tar_seconds = time.monotonic() - started
    started = time.monotonic()
    result = pycri(env, "commit", cid, "big:1")
    commit_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    logged = [
        json.loads(line)
        for line in env.daemon.log_path.read_text().splitlines()
        if "container committed" in line
    ]
    in_daemon = logged[-1]["seconds"]
    with capsys.disabled():
        print(
            f"\n100 MiB of changes: tar -czf + sha256sum {tar_seconds:.2f}s, "
            f"pycri commit {commit_seconds:.2f}s (in the daemon {in_daemon:.2f}s)"
        )
    assert commit_seconds < 3 * tar_seconds + 2


def test_commit_racing_a_removal_either_commits_or_is_not_found(env: Env) -> None:
    import threading

    pod = env.pod("race")
    outcomes: list[str] = []
    with grpc.insecure_channel(env.daemon.endpoint) as channel:
        commit = channel.unary_unary(
            "/pycri.v1.Images/Commit",
            request_serializer=lambda d: json.dumps(d).encode(),
            response_deserializer=json.loads,
        )

        def committing(cid: str, name: str) -> None:
            try:
                commit({"container_id": cid, "name": name}, timeout=120)
                outcomes.append("committed")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

        for attempt, head_start in enumerate((0.1, 0.0, 0.1, 0.0)):
            script = "head -c 20000000 /dev/urandom > /blob; touch /ready; sleep 1000"
            cid = env.run(pod, f"racer{attempt}", ["sh", "-c", script])
            _ready(env, cid)
            committer = threading.Thread(target=committing, args=(cid, f"race:{attempt}"))
            committer.start()
            time.sleep(head_start)
            env.cri.remove_container(cid)
            committer.join()
    assert set(outcomes) <= {"committed", "NOT_FOUND"}, outcomes
    # Whatever was committed is whole and runnable; nothing of a refused commit is left.
    for image in env.cri.list_images():
        for tag in image.repo_tags:
            if "/race:" in tag:
                check = env.cri.create_container(
                    pod, f"check-{tag[-1]}", tag, command=["test", "-s", "/blob"], log_path="c.log"
                )
                env.cri.start_container(check)
                assert wait_exited(env.cri, check).exit_code == 0
    assert list((env.daemon.root / "tmp").iterdir()) == []
    print(f"\ncommit vs removal: {outcomes}")


def test_the_cli_names_the_images_service_as_the_daemon_serves_it() -> None:
    from cri_runtime.daemon import cli, images_api

    assert cli.IMAGES_SERVICE == images_api.IMAGES_SERVICE


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root``: type and mode, owner, size, mtime, device, link count, xattrs,
    content digest or link target (atimes left out: reading a file for its digest moves them)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            xattrs = {
                k: os.getxattr(path, k, follow_symlinks=False)
                for k in os.listxattr(path, follow_symlinks=False)
            }
            body: str | None = None
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            mtime = None if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 else st.st_mtime_ns  # whiteouts: now
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                mtime,
                st.st_rdev,
                st.st_nlink,
                xattrs,
                body,
            )
    return out


def test_the_layer_written_beside_the_blob_is_what_the_unpacker_makes_of_it(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "dir" / "sub").mkdir(parents=True)
    (upper / "opaque").mkdir()
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "dir", "trusted.overlay.origin", b"\x00\x01")  # overlay's own: dropped
    os.setxattr(upper / "dir", "user.dir", b"d")
    (upper / "opaque" / "kept").write_text("kept")
    os.mknod(upper / "gone", stat.S_IFCHR, os.makedev(0, 0))  # whiteout
    os.mknod(upper / "opaque" / "gone2", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "dir" / "sub" / "file").write_text("content")
    os.setxattr(upper / "dir" / "sub" / "file", "user.k", b"\xff\x00v")
    os.link(upper / "dir" / "sub" / "file", upper / "dir" / "hard")
    os.link(upper / "dir" / "sub" / "file", upper / "zz-hard")
    os.symlink("../etc/passwd", upper / "dir" / "rel")
    os.symlink("/etc", upper / "escape")  # a symlink to a directory is kept as a link, never walked
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mknod(upper / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    with open(upper / "sparse", "wb") as fh:
        fh.truncate(3 << 20)
        fh.write(b"end")
    (upper / "suid").write_text("s")
    os.chown(upper / "suid", 1234, 5678)
    os.chmod(upper / "suid", 0o4755)
    (upper / "big").write_bytes(os.urandom(3 << 20) + b"text" * 300_000)
    (upper / "ro").mkdir(mode=0o555)
    os.utime(upper / "dir" / "sub", ns=(1_000_000_000_500_000_000, 1_000_000_000_500_000_000))

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    packed = pack_upper(upper, tmp_path / "layer.tar.gz", layer_dir=mirror)
    blob = (tmp_path / "layer.tar.gz").read_bytes()
    assert packed.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and packed.size == len(blob)
    raw = gzip.decompress(blob)  # one ordinary gzip member, though deflated in parallel blocks
    assert packed.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    assert (
        unpack_layer(tmp_path / "layer.tar.gz", unpacked, blob_digest=packed.digest).diff_id == packed.diff_id
    )
    assert _tree(mirror) == _tree(unpacked)
    assert os.readlink(mirror / "escape") == "/etc" and not (mirror / "escape" / "passwd").is_symlink()
    assert os.getxattr(mirror / "opaque", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.origin" not in os.listxattr(mirror / "dir")
    assert os.stat(mirror / "zz-hard").st_ino == os.stat(mirror / "dir" / "sub" / "file").st_ino


def test_healthcheck_and_onbuild_changes_are_recorded_as_docker_does() -> None:
    config = apply_changes(
        {"OnBuild": ["RUN echo first"]},
        [
            "HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=2s --retries=4 "
            "CMD wget -q -O- localhost",
            "ONBUILD COPY . /src",
        ],
    )
    assert config["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q -O- localhost"],
        "Interval": 90 * 10**9,
        "Timeout": 500 * 10**6,
        "StartPeriod": 2 * 10**9,
        "Retries": 4,
    }
    assert config["OnBuild"] == ["RUN echo first", "COPY . /src"]
    assert apply_changes({}, ['HEALTHCHECK CMD ["test", "-e", "/ok"]'])["Healthcheck"] == {
        "Test": ["CMD", "test", "-e", "/ok"]
    }
    assert apply_changes({}, ["HEALTHCHECK NONE"])["Healthcheck"] == {"Test": ["NONE"]}
    for bad, says in (
        ("HEALTHCHECK --interval=soon CMD true", "not a duration"),
        ("HEALTHCHECK --every=1s CMD true", "is not one of --interval"),
        ("HEALTHCHECK true", "CMD command, or NONE"),
        ("ONBUILD FROM busybox", "cannot trigger FROM"),
        ("ONBUILD ONBUILD RUN x", "cannot trigger ONBUILD"),
    ):
        with pytest.raises(InvalidArgument, match=says):
            apply_changes({}, [bad])
