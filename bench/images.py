"""The benchmark's images, built in memory and pushed to the loopback registry in parallel.

* ``big`` (tag ``a``): ``layers`` incompressible layers of ``layer_bytes`` each.
* ``big`` (tag ``b``): the first ``layers - 1`` layers of ``a`` plus one new top layer, so
  its first chain IDs match ``a``'s and only the new layer needs fetching.
* ``many`` (tags ``i0000``...): tiny images, each a shared base layer plus a 1-file layer of
  its own and a config of its own (so each has its own image ID).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tests.support.images import (
    CREATED,
    Image,
    Layer,
    RegistryClient,
    image_config,
    layer_from_files,
    random_layer,
)
from tests.support.registry import Registry

BIG_REPO = "bench/big"
MANY_REPO = "bench/many"


@dataclass(frozen=True)
class BlobInfo:
    label: str
    digest: str
    size: int


@dataclass(frozen=True)
class BigImages:
    ref_a: str
    ref_b: str
    # digest -> what it is ("layer 0", "config a", ...), for reading the registry log.
    blobs: dict[str, BlobInfo]
    layers_a: list[str]
    layers_b: list[str]
    new_layer: str  # digest of b's layer that a lacks
    total_a: int  # bytes of all blobs of a (layers + config)


def _push_blobs(reg: Registry, repo: str, blobs: list[bytes], threads: int) -> None:
    def push(data: bytes) -> None:
        RegistryClient(reg).push_blob(repo, data)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(push, blobs))


def build_and_push_big(reg: Registry, total_bytes: int, layers: int, threads: int = 6) -> BigImages:
    per_layer = total_bytes // layers
    # Build in a pool too: sha256/gzip release the GIL for most of the work.
    with ThreadPoolExecutor(threads) as pool:
        built: list[Layer] = list(
            pool.map(lambda seed: _materialize(random_layer(per_layer, seed=1000 + seed)), range(layers + 1))
        )
    layers_a = built[:layers]
    layers_b = [*built[: layers - 1], built[layers]]
    image_a = Image.build(layers_a, cmd=["/bin/sh"], labels={"org.pycri.bench": "big-a"})
    image_b = Image.build(layers_b, cmd=["/bin/sh"], labels={"org.pycri.bench": "big-b"})

    _push_blobs(reg, BIG_REPO, [layer.blob for layer in built], threads)
    client = RegistryClient(reg)
    client.push_image(BIG_REPO, "a", image_a)  # blobs exist: only config + manifest move
    client.push_image(BIG_REPO, "b", image_b)

    blobs: dict[str, BlobInfo] = {}
    for i, layer in enumerate(built):
        blobs[layer.digest] = BlobInfo(f"layer {i}", layer.digest, layer.size)
    for name, image in (("a", image_a), ("b", image_b)):
        config = image.config_bytes()
        blobs[image.config_digest] = BlobInfo(f"config {name}", image.config_digest, len(config))
    return BigImages(
        ref_a=f"{reg.host}/{BIG_REPO}:a",
        ref_b=f"{reg.host}/{BIG_REPO}:b",
        blobs=blobs,
        layers_a=[layer.digest for layer in layers_a],
        layers_b=[layer.digest for layer in layers_b],
        new_layer=built[layers].digest,
        total_a=sum(layer.size for layer in layers_a) + len(image_a.config_bytes()),
    )


def _materialize(layer: Layer) -> Layer:
    """Compute the cached blob and digests now (in the worker thread)."""
    _ = layer.blob, layer.digest, layer.diff_id
    return layer


def _history(config_kb: int) -> list[dict[str, object]]:
    """Two layer entries, then ``empty_layer`` entries until the JSON is about ``config_kb`` KiB.

    Real images' configs are mostly history (``created_by`` of every Dockerfile step); 5-20 KiB
    is common, and the tiny configs of the default run understate per-image JSON work.
    """
    history: list[dict[str, object]] = [
        {"created": CREATED, "created_by": f"pycri bench: layer {n}"} for n in range(2)
    ]
    step = "/bin/sh -c set -eux; apt-get update; apt-get install -y --no-install-recommends pkg; " * 3
    size = 0
    while size < config_kb * 1024:
        entry = {"created": CREATED, "created_by": step, "empty_layer": True}
        history.append(entry)
        size += len(step) + 80
    return history


def build_and_push_many(reg: Registry, count: int, threads: int = 16, config_kb: int = 0) -> list[str]:
    """Push ``count`` tiny distinct images; return their references.

    ``config_kb`` > 0 pads each config with history entries to about that size.
    """
    base = layer_from_files({"etc/bench-base": "shared base layer of the ListImages benchmark\n"})
    RegistryClient(reg).push_blob(MANY_REPO, base.blob)
    history = _history(config_kb) if config_kb > 0 else None

    def push(i: int) -> str:
        own = layer_from_files({f"data/image-{i:04d}.txt": f"bench image {i}\n"})
        config = image_config(
            cmd=["/bin/sh"], labels={"org.pycri.bench": "many", "org.pycri.bench.index": str(i)}
        )
        if history is not None:
            config["history"] = history
        image = Image([base, own], config)
        client = RegistryClient(reg)
        client.push_blob(MANY_REPO, own.blob, check_exists=False)
        client.push_blob(MANY_REPO, image.config_bytes(), check_exists=False)
        tag = f"i{i:04d}"
        client.put_manifest(MANY_REPO, tag, image.manifest_bytes(), image.manifest_media_type())
        return f"{reg.host}/{MANY_REPO}:{tag}"

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(push, range(count)))
