"""`pycri image import`: OCI layout and docker save archives, with and without a running daemon."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.images import Image, busybox_layer, hostile_layer, multilayer_image

pytestmark = pytest.mark.root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def oci_archive(path: Path, image: Image, name: str) -> Path:
    manifest = image.manifest_bytes("oci")
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest("oci"),
                "size": len(manifest),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "1"},
            }
        ],
    }
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        blobs = {image.manifest_digest("oci"): manifest, image.config_digest: image.config_bytes()}
        blobs.update({layer.digest: layer.blob for layer in image.layers})
        for digest, data in blobs.items():
            _add(tar, "blobs/sha256/" + digest.removeprefix("sha256:"), data)
    return path


def docker_archive(path: Path, image: Image, tags: list[str]) -> Path:
    layers = [f"{layer.diff_id.removeprefix('sha256:')}/layer.tar" for layer in image.layers]
    config_name = image.config_digest.removeprefix("sha256:") + ".json"
    manifest = [{"Config": config_name, "RepoTags": tags, "Layers": layers}]
    with tarfile.open(path, "w") as tar:
        _add(tar, "manifest.json", json.dumps(manifest).encode())
        _add(tar, config_name, image.config_bytes())
        for name, layer in zip(layers, image.layers, strict=True):
            _add(tar, name, layer.tar)
    return path


def pycri_import(daemon: Daemon, archive: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cri_runtime.daemon.cli",
            "image",
            "import",
            str(archive),
            "--socket",
            str(daemon.socket),
            "--root",
            str(daemon.root),
            "--state",
            str(daemon.state),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_oci_layout_into_a_running_daemon(daemon: Daemon, tmp_path: Path) -> None:
    image = multilayer_image()
    archive = oci_archive(tmp_path / "oci.tar", image, "example.com/team/app:1")
    result = pycri_import(daemon, archive)
    assert result.returncode == 0, result.stderr
    assert image.config_digest in result.stdout
    with daemon.client() as client:
        status = client.image_status("example.com/team/app:1").image
        assert status.id == image.config_digest
        assert list(status.repo_digests) == [f"example.com/team/app@{image.manifest_digest('oci')}"]


def test_import_docker_save_archive(daemon: Daemon, tmp_path: Path) -> None:
    image = multilayer_image()
    archive = docker_archive(tmp_path / "docker.tar", image, ["app:1", "app:latest"])
    result = pycri_import(daemon, archive)
    assert result.returncode == 0, result.stderr
    with daemon.client() as client:
        status = client.image_status("docker.io/library/app:1").image
        assert status.id == image.config_digest
        assert sorted(status.repo_tags) == ["docker.io/library/app:1", "docker.io/library/app:latest"]


def test_import_without_a_daemon_writes_the_store_it_later_serves(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(name="offline")
    daemon.stop()
    image = multilayer_image()
    result = pycri_import(daemon, docker_archive(tmp_path / "d.tar", image, ["offline:1"]))
    assert result.returncode == 0, result.stderr
    daemon.start()
    with daemon.client() as client:
        assert client.image_status("offline:1").image.id == image.config_digest


def test_import_of_a_hostile_layer_is_refused_and_stores_nothing(daemon: Daemon, tmp_path: Path) -> None:
    image = Image.build([busybox_layer(), hostile_layer("dotdot")], cmd=["sh"])
    result = pycri_import(daemon, docker_archive(tmp_path / "h.tar", image, ["evil:1"]))
    assert result.returncode != 0
    assert "INVALID_ARGUMENT" in result.stderr
    with daemon.client() as client:
        assert client.list_images() == []
    assert list((daemon.root / "layers").iterdir()) == []


def test_import_of_a_file_that_is_not_an_image_archive_says_so(daemon: Daemon, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    with tarfile.open(junk, "w") as tar:
        _add(tar, "hello.txt", b"hi")
    result = pycri_import(daemon, junk)
    assert result.returncode != 0
    assert "neither an OCI image layout" in result.stderr
