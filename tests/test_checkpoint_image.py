"""Restore from a checkpoint OCI image (CRI-O's way), against a real daemon and registry on this host.

A checkpoint image is one whose manifest carries ``io.kubernetes.cri-o.annotations.checkpoint.name``
and whose layer holds a checkpoint archive's members at its root (what ``checkpointctl build`` and
``pycri checkpoint-image`` make). Here CRIU cannot run, so a sound checkpoint image pulled from the
registry must be recognised (the CreateContainer answers that checkpointing is unavailable, where
a plain image with the same content creates an ordinary container), and hostile or foreign ones
refused with InvalidArgument; every refusal leaves no container, directory or mount behind and the
image's layers released. The restore itself runs in the VM guest (vm/guest_checkpoint.py).
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.runtime import checkpoint
from imageservice.checkpoint_image import CHECKPOINT_NAME_ANNOTATION
from imageservice.db import ImageDB, ImageRecord
from imageservice.platform import host_platform
from tests.support.images import Image, Layer, RegistryClient, image_config, push_image
from tests.support.pods import Env
from tests.support.registry import Registry
from tests.support.wait import wait_for
from tests.test_checkpoint import RUNTIME, _layer, _member, _nothing_made, _refused, runc_checkpoint_env
from tests.test_commit import pycri

pytestmark = pytest.mark.root


@pytest.fixture
def env(daemon_factory, pod_image: str, tmp_path: Path) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    """test_checkpoint's runc daemon (checkpoint_dir ``tmp_path/checkpoints``)."""
    yield from runc_checkpoint_env(daemon_factory, pod_image, tmp_path)


OTHER_ARCH = "s390x" if host_platform().architecture != "s390x" else "amd64"


def _content(
    image_id: str,
    *,
    architecture: str | None = None,
    spec: bool = True,
    config_dump: bool = True,
    images: bool = True,
    diff: bool = True,
    rootfs_diff: bytes | None = None,
    extra: Callable[[tarfile.TarFile], None] | None = None,
) -> bytes:
    """A checkpoint archive's members as a tar (an archive, and the layer of a checkpoint image);
    the CRIU images are stand-ins: nothing here reaches CRIU."""
    config = {
        "id": "0" * 64,
        "name": "counter",
        "rootfsImage": image_id,
        "rootfsImageRef": image_id,
        "rootfsImageName": "test/pods:1",
        "OCIRuntime": RUNTIME,
        "architecture": architecture or host_platform().architecture,
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        if config_dump:
            _member(tar, checkpoint.CONFIG_DUMP, json.dumps(config).encode())
        if spec:
            _member(tar, checkpoint.SPEC_DUMP, b'{"ociVersion": "1.0.2"}')
        if images:
            _member(tar, "checkpoint", kind=tarfile.DIRTYPE)
            _member(tar, "checkpoint/inventory.img", b"\x00" * 16)
        if diff:
            _member(
                tar, checkpoint.ROOTFS_DIFF_TAR, rootfs_diff or _layer([("kept/file", b"written before\n")])
            )
        if extra:
            extra(tar)
    return out.getvalue()


def _push_checkpoint_image(
    registry: Registry, repo: str, content: bytes, *, annotate: bool = True, architecture: str | None = None
) -> str:
    """``content`` as a one-layer image in the test registry, the way buildah makes a checkpoint
    image (``checkpointctl build``): the CRI-O annotation on the manifest."""
    image = Image(
        [Layer(content)],
        # (A config of its own without the annotation: an image ID is its config's digest.)
        image_config(
            architecture=architecture or host_platform().architecture,
            labels=None if annotate else {"plain": "yes"},
        ),
        {CHECKPOINT_NAME_ANNOTATION: "counter"} if annotate else None,
    )
    push_image(registry, f"test/{repo}", "1", image)
    return f"{registry.host}/test/{repo}:1"


def _no_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(path))]


def _refused_and_clean(env: Env, pod: str, image: str, planted: list[Path]) -> grpc.RpcError:
    err = _refused(lambda: env.cri.create_container(pod, "restored", image))
    _nothing_made(env, planted)
    assert _no_mounts_under(env.daemon.root) == []
    return err


def test_checkpoint_image_pulled_from_a_registry_is_recognised_by_its_annotation(
    env: Env, registry: Registry, tmp_path: Path
) -> None:
    status = checkpoint.criu_status()
    if status.available:
        pytest.skip("criu works on this host: the VM guest test covers the restore")
    pod = env.pod("ckptimg")
    image_id = env.cri.image_status(env.image).image.id
    content = _content(image_id)
    annotated = _push_checkpoint_image(registry, "ckpt-image", content)
    plain = _push_checkpoint_image(registry, "ckpt-plain", content, annotate=False)
    # Another module's image on the same daemon may already hold the same layer (the content is made from
    # the shared base image): compare with what the store had before these pulls, not after.
    layers_before_pull = set(os.listdir(env.daemon.root / "layers"))
    env.cri.pull(annotated)
    env.cri.pull(plain)

    err = _refused_and_clean(env, pod, annotated, [])

    # Recognised as a checkpoint: it went as far as the restore needing CRIU.
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "checkpointing is not available on this node" in (err.details() or "")
    # The same content without the annotation is an ordinary image: an ordinary container.
    cid = env.cri.create_container(pod, "plain", plain, command=["/kept/file"])
    assert env.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_CREATED
    env.cri.remove_container(cid)
    # The image's layers were held only while read: removing the images frees them.
    env.cri.remove_image(annotated)
    env.cri.remove_image(plain)
    # RemoveContainer lets go of its layers from a background clean-up: they go once that has run.
    left = wait_for(lambda: set(os.listdir(env.daemon.root / "layers")) <= layers_before_pull)
    assert left, sorted(set(os.listdir(env.daemon.root / "layers")) - layers_before_pull)
    assert _no_mounts_under(env.daemon.root) == []


def test_hostile_or_foreign_checkpoint_images_are_refused_with_nothing_made(
    env: Env, registry: Registry, tmp_path: Path
) -> None:
    pod = env.pod("ckptbad")
    image_id = env.cri.image_status(env.image).image.id
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    here = host_platform().architecture
    cases = {
        "config.dump a link to a host file": (
            _content(
                image_id,
                config_dump=False,
                extra=lambda t: _member(
                    t, checkpoint.CONFIG_DUMP, kind=tarfile.SYMTYPE, linkname=str(victim)
                ),
            ),
            "config.dump cannot be read",
        ),
        "checkpoint/ a link to a host directory": (
            _content(
                image_id,
                images=False,
                extra=lambda t: _member(t, "checkpoint", kind=tarfile.SYMTYPE, linkname=str(tmp_path)),
            ),
            "has no checkpoint/",
        ),
        "a CRIU image a link to a host file": (
            _content(
                image_id,
                extra=lambda t: _member(
                    t, "checkpoint/pages-1.img", kind=tarfile.SYMTYPE, linkname=str(victim)
                ),
            ),
            "'checkpoint/pages-1.img' is not a plain file or directory",
        ),
        "rootfs diff a link": (
            _content(
                image_id,
                diff=False,
                extra=lambda t: _member(t, "rootfs-diff.tar", kind=tarfile.SYMTYPE, linkname=str(victim)),
            ),
            "rootfs-diff.tar is not a plain file",
        ),
        "rootfs diff climbing": (
            _content(image_id, rootfs_diff=_layer([("../../victim", b"x")])),
            "rootfs-diff.tar",
        ),
        "made on another architecture": (
            _content(image_id, architecture=OTHER_ARCH),
            f"was made on {OTHER_ARCH}; this node is {here}",
        ),
        "no spec.dump": (_content(image_id, spec=False), "has no spec.dump"),
        "no CRIU images": (_content(image_id, images=False), "has no checkpoint/"),
    }
    for n, (what, (content, words)) in enumerate(cases.items()):
        image = _push_checkpoint_image(registry, f"ckpt-bad-{n}", content)
        env.cri.pull(image)

        err = _refused_and_clean(env, pod, image, [tmp_path / "out"])

        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.code(), err.details())
        assert words in (err.details() or ""), (what, err.details())
        assert victim.read_text() == "host file\n"
        env.cri.remove_image(image)
    # The daemon is unaffected: an ordinary container still runs.
    cid = env.run(pod, "after", ["sleep", "1000"])
    assert env.cri.container_status(cid).status.state == pb.ContainerState.CONTAINER_RUNNING


def test_pycri_checkpoint_image_makes_an_image_that_pushes_pulls_and_is_recognised(
    env: Env, registry: Registry, tmp_path: Path
) -> None:
    image_id = env.cri.image_status(env.image).image.id
    archive = tmp_path / "counter.tar"
    archive.write_bytes(_content(image_id))
    target = f"{registry.host}/test/ckpt-made:1"

    made = pycri(env, "checkpoint-image", str(archive), target)
    assert made.returncode == 0, made.stderr
    pushed = pycri(env, "push", target)
    assert pushed.returncode == 0, pushed.stderr

    body, media_type, _ = RegistryClient(registry).get_manifest("test/ckpt-made", "1")
    manifest = json.loads(body)
    assert media_type == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["annotations"] == {CHECKPOINT_NAME_ANNOTATION: "counter"}
    assert len(manifest["layers"]) == 1
    config = json.loads(RegistryClient(registry).get_blob("test/ckpt-made", manifest["config"]["digest"]))
    assert config["architecture"] == host_platform().architecture
    layer = RegistryClient(registry).get_blob("test/ckpt-made", manifest["layers"][0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:gz") as tar:
        assert {"config.dump", "spec.dump", "checkpoint/inventory.img", "rootfs-diff.tar"} <= set(
            tar.getnames()
        )
    # Forgotten here, pulled back: the annotation is what the store keeps to know it.
    env.cri.remove_image(target)
    env.cri.pull(target)
    if checkpoint.criu_status().available:
        return  # the guest test restores from it
    pod = env.pod("ckptmade")
    err = _refused_and_clean(env, pod, target, [])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "checkpointing is not available on this node" in (err.details() or "")


def test_pycri_checkpoint_image_refuses_what_is_no_checkpoint_archive(env: Env, tmp_path: Path) -> None:
    image_id = env.cri.image_status(env.image).image.id
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar\n" * 100)
    no_images = tmp_path / "no-images.tar"
    no_images.write_bytes(_content(image_id, images=False))
    sound = tmp_path / "sound.tar"
    sound.write_bytes(_content(image_id))
    images_before = {i.id for i in env.cri.list_images()}
    cases = [
        ((str(tmp_path / "missing.tar"), "test/x:1"), "NOT_FOUND", "is not a file"),
        ((str(garbage), "test/x:1"), "INVALID_ARGUMENT", "is not a readable tar"),
        ((str(no_images), "test/x:1"), "INVALID_ARGUMENT", "has no checkpoint"),
        ((str(sound), "test/x@sha256:" + "a" * 64), "INVALID_ARGUMENT", "without a digest"),
    ]
    for args, code, words in cases:
        result = pycri(env, "checkpoint-image", *args)
        assert result.returncode == 1, (args, result.stdout)
        assert f"failed: {code}: " in result.stderr and words in result.stderr, (args, result.stderr)
    assert {i.id for i in env.cri.list_images()} == images_before
    assert os.listdir(env.daemon.root / "tmp") == []


def test_checkpoint_image_made_on_another_architecture_is_refused(env: Env, tmp_path: Path) -> None:
    image_id = env.cri.image_status(env.image).image.id
    archive = tmp_path / "foreign.tar"
    archive.write_bytes(_content(image_id, architecture=OTHER_ARCH))
    made = pycri(env, "checkpoint-image", str(archive), "test/foreign:1")
    assert made.returncode == 0, made.stderr
    pod = env.pod("foreign")

    err = _refused_and_clean(env, pod, "test/foreign:1", [])

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    here = host_platform().architecture
    details = err.details() or ""
    assert "checkpoint image" in details and f"is for {OTHER_ARCH}; this node is {here}" in details, details
    env.cri.remove_image("test/foreign:1")


def test_image_store_made_before_annotations_were_kept_opens_and_keeps_them_from_then_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pycri.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE images (id TEXT PRIMARY KEY, manifest_digest TEXT NOT NULL, config BLOB NOT NULL, "
        "size INTEGER NOT NULL, pinned INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);"
        "INSERT INTO images VALUES ('sha256:" + "1" * 64 + "', '', '{}', 2, 0, 1.0);"
    )
    old.commit()
    old.close()

    db = ImageDB(path)
    try:
        (before,) = db.load_images()
        assert before.annotations == {}
        db.save_image(ImageRecord("sha256:" + "2" * 64, "", b"{}", 2, [], annotations={"a.b/c": "d"}))
        loaded = {r.id: r.annotations for r in db.load_images()}
    finally:
        db.close()
    assert loaded == {"sha256:" + "1" * 64: {}, "sha256:" + "2" * 64: {"a.b/c": "d"}}
