"""Image metadata in SQLite (``<root>/pycri.db``).

The database is the record of what is present; layer directories on disk count only
when a row names them. WAL mode with synchronous=FULL: a committed pull survives a crash.
Every write is a durable commit (an fsync): callers make them outside any lock that
queries take (see imageservice.store). The connection has its own lock.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    manifest_digest TEXT NOT NULL,
    config BLOB NOT NULL,
    size INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    annotations TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY,
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest'))
);
CREATE TABLE IF NOT EXISTS image_layers (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    chain_id TEXT NOT NULL,
    diff_id TEXT NOT NULL,
    blob_digest TEXT NOT NULL,
    blob_size INTEGER NOT NULL,
    PRIMARY KEY (image_id, position)
);
CREATE TABLE IF NOT EXISTS layers (
    chain_id TEXT PRIMARY KEY,
    diff_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    inodes INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class LayerRef:
    chain_id: str
    diff_id: str
    blob_digest: str
    blob_size: int


@dataclass
class ImageRecord:
    id: str
    manifest_digest: str
    config_bytes: bytes
    size: int
    layers: list[LayerRef]
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    pinned: bool = False
    created_at: float = 0.0
    # The image manifest's annotations (a checkpoint image is known by one of them).
    annotations: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def config(self) -> dict:
        # Parsed once: ListImages reads it for every image on every call.
        return json.loads(self.config_bytes)

    @functools.cached_property
    def user(self) -> tuple[int | None, str]:
        return image_user(self.config)


def image_user(config: dict) -> tuple[int | None, str]:
    """The image's USER as CRI reports it: a numeric uid, else a user name.

    ``1002`` and ``1002:grp`` give uid 1002; ``www-data`` and ``www-data:grp`` give the name.
    """
    user = str((config.get("config") or {}).get("User") or "")
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name


def _annotations(text: str) -> dict[str, str]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def manifest_annotations(manifest: dict) -> dict[str, str]:
    """An image manifest's ``annotations``: string keys to string values (anything else in the
    map is left out, as a registry's hostile or sloppy manifest may carry it)."""
    raw = manifest.get("annotations")
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


@dataclass(frozen=True)
class LayerRecord:
    chain_id: str
    diff_id: str
    size: int
    inodes: int


class ImageDB:
    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(images)")}
            if "annotations" not in columns:  # a store made before annotations were kept
                self._conn.execute("ALTER TABLE images ADD COLUMN annotations TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def load_images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, manifest_digest, config, size, pinned, created_at, annotations FROM images"
            ).fetchall()
            names = self._conn.execute(
                "SELECT name, image_id, kind FROM image_names ORDER BY name"
            ).fetchall()
            layer_rows = self._conn.execute(
                "SELECT image_id, chain_id, diff_id, blob_digest, blob_size FROM image_layers "
                "ORDER BY image_id, position"
            ).fetchall()
        images = {
            r[0]: ImageRecord(
                id=r[0],
                manifest_digest=r[1],
                config_bytes=r[2],
                size=r[3],
                layers=[],
                pinned=bool(r[4]),
                created_at=r[5],
                annotations=_annotations(r[6]),
            )
            for r in rows
        }
        for name, image_id, kind in names:
            record = images[image_id]
            (record.repo_tags if kind == "tag" else record.repo_digests).append(name)
        for image_id, chain_id, diff_id, blob_digest, blob_size in layer_rows:
            images[image_id].layers.append(LayerRef(chain_id, diff_id, blob_digest, blob_size))
        return list(images.values())

    def load_layers(self) -> dict[str, LayerRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT chain_id, diff_id, size, inodes FROM layers").fetchall()
        return {r[0]: LayerRecord(*r) for r in rows}

    def add_layer(self, layer: LayerRecord) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO layers (chain_id, diff_id, size, inodes) VALUES (?, ?, ?, ?)",
                (layer.chain_id, layer.diff_id, layer.size, layer.inodes),
            )

    def remove_layer(self, chain_id: str) -> None:
        self.remove_layers([chain_id])

    def remove_layers(self, chain_ids: list[str]) -> None:
        """Forget several layers in one transaction (one durable commit, not one each)."""
        with self._transaction() as conn:
            conn.executemany("DELETE FROM layers WHERE chain_id = ?", [(c,) for c in chain_ids])

    def save_image(self, record: ImageRecord) -> None:
        """Insert or update ``record`` and point its names at it, in one transaction.

        A tag that named another image moves to this one, as ``docker pull`` does.
        """
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO images (id, manifest_digest, config, size, pinned, created_at, annotations) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET pinned = excluded.pinned, annotations = excluded.annotations",
                (
                    record.id,
                    record.manifest_digest,
                    record.config_bytes,
                    record.size,
                    int(record.pinned),
                    record.created_at,
                    json.dumps(record.annotations, sort_keys=True),
                ),
            )
            conn.execute("DELETE FROM image_layers WHERE image_id = ?", (record.id,))
            conn.executemany(
                "INSERT INTO image_layers (image_id, position, chain_id, diff_id, blob_digest, blob_size) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (record.id, i, layer.chain_id, layer.diff_id, layer.blob_digest, layer.blob_size)
                    for i, layer in enumerate(record.layers)
                ],
            )
            for name in (*record.repo_tags, *record.repo_digests):
                kind = "tag" if name in record.repo_tags else "digest"
                conn.execute(
                    "INSERT INTO image_names (name, image_id, kind) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id, kind = excluded.kind",
                    (name, record.id, kind),
                )

    def delete_image(self, image_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
