"""Load images from archives: an OCI image layout in a tar, or a ``docker save`` tar.

For nodes without a registry. The archive is as untrusted as a registry: member names
are checked before anything is written, every blob is verified against its digest, and
layers go through the same unpacker as pulled ones.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import tarfile
import uuid
from pathlib import Path

from cri_runtime.errors import DataLoss, InvalidArgument, NotFound
from imageservice.db import ImageRecord, manifest_annotations
from imageservice.platform import describe
from imageservice.reference import parse_reference
from imageservice.store import INDEX_TYPES, Descriptor, ImageStore

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def _safe_member_name(name: str) -> str | None:
    normal = posixpath.normpath(name)
    if normal.startswith("/") or normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return normal


def _extract(archive: Path, work: Path) -> dict[str, Path]:
    """Copy the archive's regular files into ``work``; map member name -> file."""
    files: dict[str, Path] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = _safe_member_name(member.name)
                if name is None:
                    raise InvalidArgument(f"archive {archive}: member {member.name!r} escapes the archive")
                source = tar.extractfile(member)
                if source is None:
                    continue
                target = work / uuid.uuid4().hex
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
                files[name] = target
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidArgument(f"{archive} is not a readable tar archive: {exc}") from None
    return files


def _json(files: dict[str, Path], name: str, archive: Path) -> object:
    path = files.get(name)
    if path is None:
        raise InvalidArgument(f"archive {archive} has no {name}")
    if path.stat().st_size > 4 * 1024 * 1024:
        raise InvalidArgument(f"archive {archive}: {name} is larger than 4 MiB")
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        raise InvalidArgument(f"archive {archive}: {name} is not valid JSON") from None


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _blob(files: dict[str, Path], desc: Descriptor, archive: Path) -> Path:
    path = files.get("blobs/" + desc.digest.replace(":", "/"))
    if path is None:
        raise NotFound(f"archive {archive} lacks blob {desc.digest}")
    if path.stat().st_size != desc.size:
        raise DataLoss(
            f"archive {archive}: blob {desc.digest} is {path.stat().st_size} bytes, not {desc.size}"
        )
    return path


def _image_names(annotations: dict) -> list[str]:
    for key in (CONTAINERD_NAME, REF_NAME):
        value = annotations.get(key)
        if isinstance(value, str) and ("/" in value or ":" in value):
            try:
                return [str(parse_reference(value))]
            except InvalidArgument:
                continue
    return []


def _import_oci(store: ImageStore, files: dict[str, Path], archive: Path) -> list[ImageRecord]:
    index = _json(files, "index.json", archive)
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidArgument(f"archive {archive}: index.json has no manifests list")
    records = []
    for raw in index["manifests"]:
        top = Descriptor.parse(raw, f"archive {archive}: index.json entry")
        names = _image_names(raw.get("annotations") or {})
        desc = top
        document = _json(files, "blobs/" + desc.digest.replace(":", "/"), archive)
        if _sha256(_blob(files, desc, archive)) != desc.digest:
            raise DataLoss(f"archive {archive}: manifest {desc.digest} does not match its digest")
        if isinstance(document, dict) and (desc.media_type in INDEX_TYPES or "manifests" in document):
            choices = document.get("manifests") or []
            match = next(
                (
                    m
                    for m in choices
                    if isinstance(m, dict) and store.platform.matches(m.get("platform") or {})
                ),
                None,
            )
            if match is None:
                available = ", ".join(
                    describe(m.get("platform") or {}) for m in choices if isinstance(m, dict)
                )
                raise NotFound(f"archive {archive}: no manifest for {store.platform}; available: {available}")
            desc = Descriptor.parse(match, f"archive {archive}: index entry")
            document = _json(files, "blobs/" + desc.digest.replace(":", "/"), archive)
            if _sha256(_blob(files, desc, archive)) != desc.digest:
                raise DataLoss(f"archive {archive}: manifest {desc.digest} does not match its digest")
        if not isinstance(document, dict):
            raise InvalidArgument(f"archive {archive}: manifest {desc.digest} is not a JSON object")
        config = Descriptor.parse(document.get("config"), f"archive {archive}: config")
        config_path = _blob(files, config, archive)
        config_bytes = config_path.read_bytes()
        if "sha256:" + hashlib.sha256(config_bytes).hexdigest() != config.digest:
            raise DataLoss(f"archive {archive}: config {config.digest} does not match its digest")
        layers = [
            Descriptor.parse(raw_layer, f"archive {archive}: layer")
            for raw_layer in document.get("layers") or []
        ]
        blobs = [(layer, _blob(files, layer, archive)) for layer in layers]
        records.append(
            store.import_image(
                names, top.digest, config_bytes, blobs, annotations=manifest_annotations(document)
            )
        )
    return records


def _import_docker(store: ImageStore, files: dict[str, Path], archive: Path) -> list[ImageRecord]:
    manifest = _json(files, "manifest.json", archive)
    if not isinstance(manifest, list):
        raise InvalidArgument(f"archive {archive}: manifest.json is not a list")
    records = []
    for entry in manifest:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidArgument(f"archive {archive}: manifest.json entry without Config")
        config_name = _safe_member_name(entry["Config"])
        config_path = files.get(config_name or "")
        if config_path is None:
            raise NotFound(f"archive {archive} lacks config {entry['Config']}")
        config_bytes = config_path.read_bytes()
        blobs = []
        for layer_name in entry.get("Layers") or []:
            path = files.get(_safe_member_name(str(layer_name)) or "")
            if path is None:
                raise NotFound(f"archive {archive} lacks layer {layer_name}")
            blobs.append(
                (
                    Descriptor("application/vnd.oci.image.layer.v1.tar", _sha256(path), path.stat().st_size),
                    path,
                )
            )
        names = [str(parse_reference(tag)) for tag in entry.get("RepoTags") or []]
        records.append(store.import_image(names, None, config_bytes, blobs))
    return records


def import_archive(store: ImageStore, archive: Path) -> list[ImageRecord]:
    if not archive.is_file():
        raise NotFound(f"archive {archive} does not exist")
    work = store.tmp_dir / f"import-{uuid.uuid4().hex}"
    work.mkdir(mode=0o700)
    try:
        files = _extract(archive, work)
        if "manifest.json" in files:
            return _import_docker(store, files, archive)
        if "index.json" in files:
            return _import_oci(store, files, archive)
        raise InvalidArgument(
            f"{archive} is neither an OCI image layout (index.json) nor a docker save archive (manifest.json)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
