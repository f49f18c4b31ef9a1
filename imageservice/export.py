"""Images out: an image of the store as an OCI image layout tar or a ``docker save`` tar, both
loadable back with ``pycri image import`` (imageservice.importer).

The layers are the compressed blobs the store kept next to each unpacked layer (the bytes
the diff IDs were computed from); an image whose layers were stored before blobs were kept
cannot be exported, and the error says so. The archive is written next to its destination
under a temporary name and renamed into place when complete: a failure leaves no file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

from cri_runtime.errors import FailedPrecondition, InvalidArgument, from_os_error
from imageservice.db import ImageRecord
from imageservice.store import ImageStore

ExportFormat = Literal["oci", "docker"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

_LAYER_TYPES = {
    "oci": {
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
        "tar": "application/vnd.oci.image.layer.v1.tar",
    },
    "docker": {
        "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "tar": "application/vnd.docker.image.rootfs.diff.tar",
    },
}


@dataclass(frozen=True)
class LayerBlob:
    digest: str
    size: int
    diff_id: str
    compression: str  # gzip, zstd or tar
    path: Path


def compression_of(path: Path) -> str:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "tar"


def layer_blobs(store: ImageStore, record: ImageRecord) -> list[LayerBlob]:
    out = []
    for layer in record.layers:
        path = store.layer_blob(layer.chain_id, layer.blob_digest)
        if path is None:
            raise FailedPrecondition(
                f"image {record.id}: the blob of layer {layer.blob_digest} was not kept "
                "(stored by an older pycri); pull the image again to export or push it"
            )
        out.append(LayerBlob(layer.blob_digest, layer.blob_size, layer.diff_id, compression_of(path), path))
    return out


def manifest_format(record: ImageRecord) -> ExportFormat:
    """The media types to publish an image with: a Docker-made config (it names the Docker
    version or the container it came from) keeps Docker schema 2, anything else is OCI."""
    config = record.config
    return "docker" if "docker_version" in config or "container_config" in config else "oci"


def image_manifest(record: ImageRecord, blobs: list[LayerBlob], fmt: ExportFormat) -> bytes:
    layer_types = _LAYER_TYPES[fmt]
    layers = []
    for blob in blobs:
        media_type = layer_types.get(blob.compression)
        if media_type is None:
            raise FailedPrecondition(
                f"layer {blob.digest} is {blob.compression}-compressed, which Docker schema 2 cannot name; "
                "use the OCI format"
            )
        layers.append({"mediaType": media_type, "digest": blob.digest, "size": blob.size})
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG,
            "digest": record.id,
            "size": len(record.config_bytes),
        },
        "layers": layers,
    }
    if record.annotations and fmt == "oci":  # Docker schema 2 has no annotations
        manifest["annotations"] = dict(sorted(record.annotations.items()))
    return json.dumps(manifest, separators=(",", ":")).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    with open(path, "rb") as fh:
        tar.addfile(info, fh)


def _decompressed(blob: LayerBlob, work: Path) -> Path:
    """The layer as the plain tar ``docker save`` stores (its digest is the diff ID)."""
    if blob.compression == "tar":
        return blob.path
    out = work / f"{uuid.uuid4().hex}.tar"
    with open(blob.path, "rb") as raw, open(out, "wb") as dest:
        reader: BinaryIO
        if blob.compression == "gzip":
            reader = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[assignment]
        with reader:
            shutil.copyfileobj(reader, dest, 1 << 20)
    return out


def _write_oci(tar: tarfile.TarFile, record: ImageRecord, blobs: list[LayerBlob]) -> None:
    manifest = image_manifest(record, blobs, "oci")
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    entry: dict = {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest)}
    if record.repo_tags:
        name = record.repo_tags[0]
        entry["annotations"] = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name.rpartition(":")[2],
        }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    _add_bytes(tar, "index.json", json.dumps(index).encode())
    _add_bytes(tar, "blobs/sha256/" + manifest_digest.removeprefix("sha256:"), manifest)
    _add_bytes(tar, "blobs/sha256/" + record.id.removeprefix("sha256:"), record.config_bytes)
    for blob in {b.digest: b for b in blobs}.values():
        _add_file(tar, "blobs/sha256/" + blob.digest.removeprefix("sha256:"), blob.path)


def _write_docker(tar: tarfile.TarFile, record: ImageRecord, blobs: list[LayerBlob], work: Path) -> None:
    config_name = record.id.removeprefix("sha256:") + ".json"
    layer_names = []
    for blob in blobs:
        name = blob.diff_id.removeprefix("sha256:") + "/layer.tar"
        if name not in layer_names:
            plain = _decompressed(blob, work)
            _add_file(tar, name, plain)
            if plain != blob.path:
                plain.unlink()
        layer_names.append(name)
    manifest = [{"Config": config_name, "RepoTags": list(record.repo_tags), "Layers": layer_names}]
    _add_bytes(tar, config_name, record.config_bytes)
    _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())


def export_image(store: ImageStore, text: str, dest: Path, fmt: ExportFormat = "oci") -> ImageRecord:
    """Write the image ``text`` names to ``dest`` as an archive of format ``fmt``."""
    if fmt not in ("oci", "docker"):
        raise InvalidArgument(f"export format {fmt!r} is not oci or docker")
    if not dest.is_absolute():
        raise InvalidArgument(f"export destination {str(dest)!r} must be an absolute path")
    if not dest.parent.is_dir():
        raise InvalidArgument(f"export destination's directory {str(dest.parent)!r} does not exist")
    record = store.get(text)
    blobs = layer_blobs(store, record)
    partial = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.partial"
    work = store.tmp_dir / f"export-{uuid.uuid4().hex}"
    work.mkdir(mode=0o700)
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            if fmt == "oci":
                _write_oci(tar, record, blobs)
            else:
                _write_docker(tar, record, blobs, work)
        os.rename(partial, dest)
    except OSError as exc:
        raise from_os_error(exc, f"cannot write {dest}") from exc
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return record
