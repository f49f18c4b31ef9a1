"""A registry is untrusted: lies about digests and sizes, endless documents and stalls
must fail the pull with a clear error, store nothing, and never stop the daemon."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.daemon.client import CRIClient
from tests.support.daemon import Daemon
from tests.support.fakeregistry import FakeRegistry, Route
from tests.support.images import (
    HOST_ARCH,
    OCI_INDEX,
    Image,
    busybox_image,
    busybox_layer,
    canonical_json,
    push_image,
    random_layer,
    sha256_digest,
)
from tests.support.registry import Registry

pytestmark = pytest.mark.root

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    server = FakeRegistry()
    yield server
    server.close()


def serve_image(fake: FakeRegistry, repo: str, tag: str, image: Image) -> None:
    manifest = image.manifest_bytes("oci")
    headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": image.manifest_digest("oci")}
    fake.routes[f"/v2/{repo}/manifests/{tag}"] = Route(headers=headers, body=manifest)
    fake.routes[f"/v2/{repo}/blobs/{image.config_digest}"] = Route(body=image.config_bytes())
    for layer in image.layers:
        fake.routes[f"/v2/{repo}/blobs/{layer.digest}"] = Route(body=layer.blob)


def nothing_stored(daemon: Daemon, cri: CRIClient) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        layers = list((daemon.root / "layers").iterdir())
        tmp = list((daemon.root / "tmp").iterdir())
        if not layers and not tmp and cri.list_images() == []:
            return True
        time.sleep(0.05)
    return False


def pull_error(cri: CRIClient, ref: str, timeout: float = 60) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        cri.pull(ref, timeout=timeout)
    return err.value


def test_fake_registry_serves_a_good_image(fake: FakeRegistry, cri: CRIClient) -> None:
    image = busybox_image()
    serve_image(fake, "ok/app", "1", image)
    assert cri.pull(f"{fake.host}/ok/app:1") == image.config_digest


def test_blob_whose_bytes_do_not_match_its_digest_fails_naming_it(
    fake: FakeRegistry, daemon: Daemon, cri: CRIClient
) -> None:
    image = busybox_image()
    serve_image(fake, "bad/app", "1", image)
    layer = image.layers[0]
    tampered = bytearray(layer.blob)
    tampered[len(tampered) // 2] ^= 0xFF
    fake.routes[f"/v2/bad/app/blobs/{layer.digest}"] = Route(body=bytes(tampered))
    err = pull_error(cri, f"{fake.host}/bad/app:1")
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert layer.digest in (err.details() or "")
    assert nothing_stored(daemon, cri)


def test_blob_size_that_disagrees_with_the_manifest_fails(
    fake: FakeRegistry, daemon: Daemon, cri: CRIClient
) -> None:
    image = busybox_image()
    serve_image(fake, "size/app", "1", image)
    layer = image.layers[0]
    fake.routes[f"/v2/size/app/blobs/{layer.digest}"] = Route(body=layer.blob + b"extra")
    err = pull_error(cri, f"{fake.host}/size/app:1")
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert layer.digest in (err.details() or "") and "bytes" in (err.details() or "")
    assert nothing_stored(daemon, cri)


def test_endless_manifest_without_length_is_cut_at_the_bound(
    fake: FakeRegistry, daemon: Daemon, cri: CRIClient
) -> None:
    fake.routes["/v2/huge/app/manifests/1"] = Route(
        headers={"Content-Type": OCI_MANIFEST}, body=fake.endless(), chunked=True
    )
    started = time.monotonic()
    err = pull_error(cri, f"{fake.host}/huge/app:1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in (err.details() or "")
    assert time.monotonic() - started < 10
    assert nothing_stored(daemon, cri)


def test_manifest_declaring_too_many_bytes_is_refused_before_reading(
    fake: FakeRegistry, cri: CRIClient
) -> None:
    fake.routes["/v2/big/app/manifests/1"] = Route(
        headers={"Content-Type": OCI_MANIFEST}, body=fake.stall(), content_length=50 * 1024 * 1024
    )
    started = time.monotonic()
    err = pull_error(cri, f"{fake.host}/big/app:1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "52428800" in (err.details() or "")
    assert time.monotonic() - started < 5


def test_schema1_manifest_is_refused_clearly(fake: FakeRegistry, cri: CRIClient) -> None:
    body = b'{"schemaVersion": 1, "name": "old/app", "tag": "1", "fsLayers": [], "history": []}'
    fake.routes["/v2/old/app/manifests/1"] = Route(
        headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}, body=body
    )
    err = pull_error(cri, f"{fake.host}/old/app:1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "schema 1" in (err.details() or "")


UNKNOWN_MANIFEST = "application/vnd.example.thing.manifest.v1+json"


def serve_manifest(fake: FakeRegistry, repo: str, ref: str, body: bytes, content_type: str) -> None:
    fake.routes[f"/v2/{repo}/manifests/{ref}"] = Route(
        headers={"Content-Type": content_type, "Docker-Content-Digest": sha256_digest(body)}, body=body
    )


def blob_requests(fake: FakeRegistry) -> list[str]:
    return [path for path in fake.requests if "/blobs/" in path]


@pytest.mark.parametrize("content_type", [UNKNOWN_MANIFEST, OCI_MANIFEST], ids=["own-type", "oci-header"])
def test_manifest_of_unknown_media_type_is_refused_and_nothing_is_stored(
    fake: FakeRegistry, daemon: Daemon, cri: CRIClient, content_type: str
) -> None:
    # Shaped like an image manifest, with every blob served: only its declared type says no.
    image = busybox_image()
    serve_image(fake, "odd/app", "1", image)
    body = canonical_json({**image.manifest("oci"), "mediaType": UNKNOWN_MANIFEST})
    serve_manifest(fake, "odd/app", "1", body, content_type)
    err = pull_error(cri, f"{fake.host}/odd/app:1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert UNKNOWN_MANIFEST in (err.details() or "")
    assert blob_requests(fake) == []
    assert nothing_stored(daemon, cri)


def test_index_entry_of_unknown_media_type_is_refused_and_nothing_is_stored(
    fake: FakeRegistry, daemon: Daemon, cri: CRIClient
) -> None:
    image = busybox_image()
    serve_image(fake, "odd/multi", "child", image)
    child = canonical_json({**image.manifest("oci"), "mediaType": UNKNOWN_MANIFEST})
    child_digest = sha256_digest(child)
    serve_manifest(fake, "odd/multi", child_digest, child, UNKNOWN_MANIFEST)
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": UNKNOWN_MANIFEST,
                    "digest": child_digest,
                    "size": len(child),
                    "platform": {"os": "linux", "architecture": HOST_ARCH},
                }
            ],
        }
    )
    serve_manifest(fake, "odd/multi", "1", index, OCI_INDEX)
    err = pull_error(cri, f"{fake.host}/odd/multi:1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert UNKNOWN_MANIFEST in (err.details() or "")
    assert blob_requests(fake) == []
    assert nothing_stored(daemon, cri)


@pytest.mark.parametrize("content_type", [OCI_MANIFEST, "application/json"])
def test_manifest_without_media_type_is_pulled_by_its_content_type_or_shape(
    fake: FakeRegistry, cri: CRIClient, content_type: str
) -> None:
    # OCI image-spec: mediaType SHOULD be set, so a manifest without one is still an image.
    image = busybox_image()
    serve_image(fake, "plain/app", "1", image)
    manifest = image.manifest("oci")
    del manifest["mediaType"]
    serve_manifest(fake, "plain/app", "1", canonical_json(manifest), content_type)
    assert cri.pull(f"{fake.host}/plain/app:1") == image.config_digest


def test_manifest_fetched_by_digest_must_match_it(fake: FakeRegistry, cri: CRIClient) -> None:
    image = busybox_image()
    other = busybox_image(cmd=["echo", "other"])
    wanted = image.manifest_digest("oci")
    fake.routes[f"/v2/swap/app/manifests/{wanted}"] = Route(
        headers={"Content-Type": OCI_MANIFEST}, body=other.manifest_bytes("oci")
    )
    err = pull_error(cri, f"{fake.host}/swap/app@{wanted}")
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert wanted in (err.details() or "")


def test_stalled_download_is_cancelled_while_other_pulls_proceed(
    fake: FakeRegistry, registry: Registry, daemon_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory("[image]\npull_progress_timeout = 2\n", name="stall")
    big = random_layer(4 * 1024 * 1024, seed=11)
    image = Image.build([busybox_layer(), big], cmd=["sh"])
    serve_image(fake, "stuck/app", "1", image)
    fake.routes[f"/v2/stuck/app/blobs/{big.digest}"] = Route(
        body=fake.stall(first=big.blob[:65536]), content_length=len(big.blob)
    )
    good = busybox_image(cmd=["echo", "meanwhile"])
    push_image(registry, "test/meanwhile", "1", good)
    outcome: dict[str, object] = {}

    def stuck_pull() -> None:
        with CRIClient(daemon.endpoint) as client:
            try:
                client.pull(f"{fake.host}/stuck/app:1", timeout=60)
                outcome["result"] = "pulled"
            except grpc.RpcError as exc:
                outcome["result"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=stuck_pull)
    thread.start()
    time.sleep(0.5)
    with daemon.client() as client:
        assert client.pull(f"{registry.host}/test/meanwhile:1") == good.config_digest
        assert client.version().runtime_name == "pycri"
    thread.join(30)
    elapsed = time.monotonic() - started
    err = outcome["result"]
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "pull_progress_timeout" in (err.details() or "")
    assert elapsed < 20
    with daemon.client() as client:
        assert [i.id for i in client.list_images()] == [good.config_digest]
        assert nothing_left_of(daemon, image)


def nothing_left_of(daemon: Daemon, image: Image) -> bool:
    tmp = list((daemon.root / "tmp").iterdir())
    top_chain_present = any(
        p.name == image.layers[-1].diff_id.removeprefix("sha256:") for p in (daemon.root / "layers").iterdir()
    )
    return not tmp and not top_chain_present


def test_deadline_passing_mid_download_cancels_and_leaves_nothing(
    fake: FakeRegistry, daemon: Daemon, cri: CRIClient
) -> None:
    big = random_layer(4 * 1024 * 1024, seed=12)
    image = Image.build([busybox_layer(), big], cmd=["sh"])
    serve_image(fake, "slow/app", "1", image)
    fake.routes[f"/v2/slow/app/blobs/{big.digest}"] = Route(
        body=fake.stall(first=big.blob[:65536]), content_length=len(big.blob)
    )
    started = time.monotonic()
    err = pull_error(cri, f"{fake.host}/slow/app:1", timeout=1.5)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    # The busybox layer may have finished before the deadline; it must not survive the failed pull.
    assert nothing_stored(daemon, cri)
    assert cri.version().runtime_name == "pycri"


def test_sigterm_during_a_stalled_pull_stops_promptly_and_keeps_nothing(
    fake: FakeRegistry, daemon_factory
) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(name="term-pull")
    big = random_layer(4 * 1024 * 1024, seed=13)
    image = Image.build([big], cmd=["sh"])
    serve_image(fake, "term/app", "1", image)
    fake.routes[f"/v2/term/app/blobs/{big.digest}"] = Route(
        body=fake.stall(first=big.blob[:65536]), content_length=len(big.blob)
    )
    outcome: list[BaseException] = []

    def doomed_pull() -> None:
        try:
            with daemon.client() as client:
                client.pull(f"{fake.host}/term/app:1")
        except grpc.RpcError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=doomed_pull)
    thread.start()
    time.sleep(1)
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 8
    thread.join(10)
    assert len(outcome) == 1  # the caller heard about it
    assert list((daemon.root / "layers").iterdir()) == []
    assert list((daemon.root / "tmp").iterdir()) == []
