"""ImageStore under concurrency: queries never wait for a writer's durable commit, and a
container's hold on an image's layers is never lost to a concurrent removal.

A real ImageStore in a temporary directory, pulling from a real docker-registry on 127.0.0.1.
A writer is kept inside its commit the way a busy database keeps it there: another
connection holds SQLite's write lock (``BEGIN IMMEDIATE``), so the store's own
``BEGIN IMMEDIATE`` waits in SQLite's busy handler, after the layer was renamed into place
and before anything is recorded.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cri_runtime.errors import NotFound
from imageservice.config import ImageConfig
from imageservice.db import ImageRecord
from imageservice.registry import Credentials
from imageservice.store import ImageStore, chain_ids
from tests.support.images import Image, busybox_layer, layer_from_files, push_image
from tests.support.registry import Registry
from tests.support.wait import wait_for

pytestmark = pytest.mark.root

# Far above a dictionary lookup, far below the commit the writer is stuck in.
MAX_QUERY_SECONDS = 0.05
ROUNDS = 200


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    image_store = ImageStore(tmp_path / "images", ImageConfig())
    yield image_store
    image_store.close()


@contextmanager
def database_write_lock(store: ImageStore) -> Iterator[None]:
    """Hold SQLite's write lock on the store's database from another connection."""
    conn = sqlite3.connect(store.root / "pycri.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def pull(store: ImageStore, ref: str) -> ImageRecord:
    return store.pull(ref, Credentials(), threading.Event())


def layer_path(store: ImageStore, chain_id: str) -> Path:
    return store.root / "layers" / chain_id.removeprefix("sha256:") / "diff"


def in_thread(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``work`` in a thread; the list receives its result or its exception."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def slowest_queries(store: ImageStore, known: ImageRecord, ref: str) -> dict[str, float]:
    """Run every query ROUNDS times; the worst latency of each, in seconds."""
    worst: dict[str, float] = {}
    queries: dict[str, Callable[[], object]] = {
        "list_images": store.list_images,
        "resolve_tag": lambda: store.resolve(ref),
        "get_id": lambda: store.get(known.id),
        "layer_dirs": lambda: store.layer_dirs(known.id),
        "hold_and_release": lambda: store.release_layers(store.hold_layers(known.id)),
        "fs_usage": store.fs_usage,
    }
    for _ in range(ROUNDS):
        for name, query in queries.items():
            started = time.monotonic()
            query()
            worst[name] = max(worst.get(name, 0.0), time.monotonic() - started)
    return worst


def test_queries_do_not_wait_while_a_pull_is_inside_its_layer_commit(
    store: ImageStore, registry: Registry
) -> None:
    known_ref = f"{registry.host}/test/store-concurrency-known:1"
    push_image(registry, "test/store-concurrency-known", "1", Image.build([busybox_layer()], cmd=["sh"]))
    known = pull(store, known_ref)
    new_layer = layer_from_files([("pulled-during-queries", "yes\n")])
    new_image = Image.build([new_layer], cmd=["sh"])
    push_image(registry, "test/store-concurrency-new", "1", new_image)
    new_ref = f"{registry.host}/test/store-concurrency-new:1"
    new_chain = chain_ids([new_layer.diff_id])[0]
    usage_before = store.fs_usage()

    with database_write_lock(store):
        puller, outcome = in_thread(lambda: pull(store, new_ref))
        # Renamed into place: the writer has reached its fsync and commit, and waits there.
        assert wait_for(lambda: layer_path(store, new_chain).is_dir())
        worst = slowest_queries(store, known, known_ref)
        assert puller.is_alive(), f"the pull left its commit early: {outcome}"
        # Nothing of the pull is visible before it is durable.
        assert store.resolve(new_ref) is None
        assert store.fs_usage().used_bytes == usage_before.used_bytes
    puller.join(timeout=30)

    assert max(worst.values()) < MAX_QUERY_SECONDS, worst
    assert isinstance(outcome[0], ImageRecord), outcome
    assert store.get(new_ref).id == new_image.config_digest
    assert store.fs_usage().used_bytes > usage_before.used_bytes


def test_queries_do_not_wait_while_a_removal_is_inside_its_commit(
    store: ImageStore, registry: Registry
) -> None:
    known_ref = f"{registry.host}/test/store-concurrency-stays:1"
    push_image(registry, "test/store-concurrency-stays", "1", Image.build([busybox_layer()], cmd=["sh"]))
    known = pull(store, known_ref)
    doomed_layer = layer_from_files([("removed-during-queries", "yes\n")])
    push_image(registry, "test/store-concurrency-doomed", "1", Image.build([doomed_layer], cmd=["sh"]))
    doomed_ref = f"{registry.host}/test/store-concurrency-doomed:1"
    doomed = pull(store, doomed_ref)

    with database_write_lock(store):
        remover, outcome = in_thread(lambda: store.remove(doomed_ref))
        worst = slowest_queries(store, known, known_ref)
        assert remover.is_alive(), f"the removal left its commit early: {outcome}"
        # Still listed: the removal is published only once its commit is durable.
        assert store.resolve(doomed_ref) is not None
    remover.join(timeout=30)

    assert max(worst.values()) < MAX_QUERY_SECONDS, worst
    assert outcome == [doomed.id]
    assert store.resolve(doomed_ref) is None
    assert not layer_path(store, doomed.layers[0].chain_id).exists()


def test_a_hold_racing_remove_image_never_loses_its_layers(store: ImageStore, registry: Registry) -> None:
    image = Image.build([busybox_layer(), layer_from_files([("held-while-removed", "yes\n")])], cmd=["sh"])
    push_image(registry, "test/store-concurrency-race", "1", image)
    ref = f"{registry.host}/test/store-concurrency-race:1"
    held_rounds = lost_rounds = 0
    for _ in range(20):
        record = pull(store, ref)
        start = threading.Barrier(3)

        def hold(image_id: str = record.id, barrier: threading.Barrier = start) -> list[str] | None:
            barrier.wait()
            try:
                return store.hold_layers(image_id)
            except NotFound:
                return None

        def remove(barrier: threading.Barrier = start) -> str | None:
            barrier.wait()
            return store.remove(ref)

        holder, held = in_thread(hold)
        remover, removed = in_thread(remove)
        start.wait()
        holder.join(timeout=30)
        remover.join(timeout=30)

        assert removed == [record.id]
        assert store.resolve(ref) is None
        chains = held[0]
        if chains is None:
            lost_rounds += 1  # removed first: the hold was refused, the layers are gone
        else:
            assert isinstance(chains, list)
            held_rounds += 1
            assert all(layer_path(store, c).is_dir() for c in chains), "a held layer was deleted"
            store.release_layers(chains)
        assert not any(layer_path(store, layer.chain_id).exists() for layer in record.layers)
        assert wait_for(lambda: not list((store.root / "tmp").iterdir()))
    assert held_rounds + lost_rounds == 20
