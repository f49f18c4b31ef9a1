"""``pycri commit`` and ``pycri image tag``: a container's changes become an image in the same
store, stacked on its image's layers, runnable at once through CRI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

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
    # Thawed after the pause: the container still answers.
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
