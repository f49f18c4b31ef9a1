"""``pycri image export``: OCI layout and ``docker save`` archives of images in the store (pulled
or committed), loadable back with ``pycri image import`` to the same image ID."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.support.pods import Env, wait_exited
from tests.test_commit import pycri

pytestmark = pytest.mark.root


def _committed(env: Env, pod: str, name: str) -> str:
    cid = env.run(pod, "writer", ["sh", "-c", "echo exported > /exported; rm -rf /www"])
    wait_exited(env.cri, cid)
    result = pycri(env, "commit", cid, name)
    assert result.returncode == 0, result.stderr
    env.cri.remove_container(cid)
    return result.stdout.split()[0]


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_export_then_import_gives_back_the_committed_image(env: Env, tmp_path: Path, fmt: str) -> None:
    pod = env.pod("export")
    image_id = _committed(env, pod, "exported:1")
    archive = tmp_path / f"image-{fmt}.tar"
    result = pycri(env, "image", "export", "--format", fmt, "exported:1", str(archive))
    assert result.returncode == 0, result.stderr
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    if fmt == "oci":
        assert {"oci-layout", "index.json"} <= names
        assert f"blobs/sha256/{image_id.removeprefix('sha256:')}" in names
    else:
        assert "manifest.json" in names and f"{image_id.removeprefix('sha256:')}.json" in names
    layers_before = {p.name for p in (env.daemon.root / "layers").iterdir()}
    env.cri.remove_image("exported:1")
    assert not any(image.id == image_id for image in env.cri.list_images())
    # The committed layer went with its image; the pulled ones stay for the pod image.
    assert len({p.name for p in (env.daemon.root / "layers").iterdir()}) == len(layers_before) - 1

    loaded = pycri(env, "image", "import", str(archive))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[0] == image_id
    image = env.cri.image_status("exported:1").image
    assert image.id == image_id
    cid = env.cri.create_container(
        pod, "reader", "exported:1", command=["sh", "-c", "cat /exported; test ! -e /www"], log_path="r.log"
    )
    env.cri.start_container(cid)
    assert wait_exited(env.cri, cid).exit_code == 0
    assert (env.logs / "export" / "r.log").read_text().endswith("exported\n")


def test_export_of_a_pulled_image_round_trips_its_id_and_diff_ids(env: Env, tmp_path: Path) -> None:
    pulled = env.cri.image_status(env.image).image
    archive = tmp_path / "pulled.tar"
    result = pycri(env, "image", "export", env.image, str(archive))
    assert result.returncode == 0, result.stderr
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == env.image
    loaded = pycri(env, "image", "import", str(archive))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[0] == pulled.id


def test_export_refusals_write_no_file(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    missing_dir = pycri(env, "image", "export", env.image, str(out / "nodir" / "x.tar"))
    assert missing_dir.returncode == 1 and "INVALID_ARGUMENT" in missing_dir.stderr
    unknown = pycri(env, "image", "export", "no-such:1", str(out / "x.tar"))
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    bad_format = pycri(env, "image", "export", "--format", "zip", env.image, str(out / "x.tar"))
    assert bad_format.returncode != 0
    assert list(out.iterdir()) == []
