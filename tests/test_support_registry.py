"""Self-test of tests/support: images built in Python, pushed to a real docker-registry.

If these fail, every pull test built on the support library would fail for the wrong reason,
so they check the library against the real server: digests, media types, basic auth and the
token flow, and that no registry process outlives its fixture.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.support import images
from tests.support import registry as registry_mod
from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    HOSTILE_KINDS,
    MULTILAYER_EXPECTED,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Image,
    ManifestFormat,
    RegistryClient,
    RegistryError,
    busybox_layer,
    hostile_layer,
    multilayer_image,
    push_blob,
    push_image,
    push_index,
    push_raw_manifest,
    random_layer,
    user_image,
)
from tests.support.registry import AuthMode, Registry, RegistryStartError, running_registry, start_registry

pytestmark = pytest.mark.timeout(120)

PLATFORMS = [{"architecture": "amd64", "os": "linux"}, {"architecture": "s390x", "os": "linux"}]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _registry_fixture(workdir: Path, auth: AuthMode = None) -> Iterator[Registry]:
    """Yield a running registry and, on teardown, prove its process and files are gone."""
    reg = start_registry(workdir, auth=auth)
    proc, root = reg.process, reg.root
    try:
        yield reg
    finally:
        reg.stop()
    assert proc is not None and proc.poll() is not None, "registry process still running"
    assert root is not None and not root.exists(), "registry temp dir not removed"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _registry_fixture(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _registry_fixture(tmp_path_factory.mktemp("basic"), auth="basic")


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _registry_fixture(tmp_path_factory.mktemp("token"), auth="token")


@pytest.fixture(scope="module")
def multi() -> Image:
    return multilayer_image()


# ----------------------------------------------------------------------------------------------
# Offline: layers and images
# ----------------------------------------------------------------------------------------------


def _members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return {m.name: m for m in tf.getmembers()}


def test_images_are_deterministic_and_digests_are_consistent(multi: Image) -> None:
    again = multilayer_image()
    for fmt in ("oci", "docker"):
        assert multi.manifest_digest(fmt) == again.manifest_digest(fmt)
    assert multi.manifest_digest("oci") != multi.manifest_digest("docker")

    for layer in multi.layers:
        assert layer.digest == _sha(layer.blob)
        assert layer.diff_id == _sha(layer.tar) == _sha(gzip.decompress(layer.blob))
        assert layer.size == len(layer.blob)
    config = json.loads(multi.config_bytes())
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer.diff_id for layer in multi.layers]}
    assert len(config["history"]) == len(multi.layers)
    assert config["config"]["User"] == "1002"
    assert config["config"]["WorkingDir"] == "/data"
    assert config["architecture"] == images.HOST_ARCH and config["os"] == "linux"

    oci = json.loads(multi.manifest_bytes("oci"))
    assert oci["mediaType"] == OCI_MANIFEST
    assert oci["config"] == {
        "mediaType": OCI_CONFIG,
        "digest": multi.config_digest,
        "size": len(multi.config_bytes()),
    }
    assert [entry["mediaType"] for entry in oci["layers"]] == [OCI_LAYER_GZIP] * 3
    docker = json.loads(multi.manifest_bytes("docker"))
    assert docker["mediaType"] == DOCKER_MANIFEST and docker["config"]["mediaType"] == DOCKER_CONFIG
    assert [entry["mediaType"] for entry in docker["layers"]] == [DOCKER_LAYER_GZIP] * 3

    zstd_layer = busybox_layer("zstd")
    assert zstd_layer.media_type("oci") == OCI_LAYER_ZSTD
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zstd_layer.blob) == zstd_layer.tar
    assert zstd_layer.diff_id == busybox_layer().diff_id  # same tar, different blob
    assert zstd_layer.digest != busybox_layer().digest


def test_busybox_layer_has_hardlinked_applets_and_users() -> None:
    members = _members(busybox_layer().tar)
    assert members["bin/busybox"].isreg() and members["bin/busybox"].mode == 0o755
    for applet in ("sh", "ls", "cat", "echo", "sleep", "id", "env", "true", "mkdir", "hostname"):
        entry = members[f"bin/{applet}"]
        assert entry.islnk() and entry.linkname == "bin/busybox", applet
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert (members["home/app"].uid, members["home/app"].gid) == (1002, 1002)
    assert all(m.mtime == images.MTIME for m in members.values())
    with tarfile.open(fileobj=io.BytesIO(busybox_layer().tar)) as tf:
        passwd = tf.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        group = tf.extractfile("etc/group").read().decode()  # type: ignore[union-attr]
    assert "app:x:1002:1002:" in passwd and "www-data:x:33:33:" in passwd
    assert "grp:x:1003:" in group


def test_multilayer_layers_carry_the_special_entries(multi: Image) -> None:
    base, middle, top = (_members(layer.tar) for layer in multi.layers)
    assert "bin/busybox" in base
    assert middle["usr/local/bin/suid-tool"].mode == 0o4755
    assert middle["etc/app.conf.link"].issym() and middle["etc/app.conf.link"].linkname == "app.conf"
    assert middle["data/abs-link"].linkname == "/etc/app.conf"
    assert (
        middle["data/hardlink-to-conf"].islnk() and middle["data/hardlink-to-conf"].linkname == "etc/app.conf"
    )
    assert {"data/old/a.txt", "data/old/b.txt", "data/old/sub/c.txt"} <= set(middle)
    assert (middle["home/app/owned.txt"].uid, middle["home/app/owned.txt"].mode) == (1002, 0o600)
    assert {"etc/.wh.removed", "data/old/.wh..wh..opq", "data/old/new.txt"} <= set(top)
    assert MULTILAYER_EXPECTED["user"] == json.loads(multi.config_bytes())["config"]["User"]


def test_hostile_layers_keep_their_dangerous_names() -> None:
    expected = {
        "abs_path": ["/etc/evil-abs"],
        "dotdot": ["../evil"],
        "symlink_escape": ["link", "link/evil"],
        "hardlink_escape": ["evil-hardlink"],
        "abs_symlink_escape": ["link", "link/evil"],
        "dotdot_nested": ["a/../../evil"],
    }
    assert set(expected) == set(HOSTILE_KINDS)
    for kind, names in expected.items():
        assert hostile_layer(kind).names() == names, kind  # type: ignore[arg-type]
    assert _members(hostile_layer("symlink_escape").tar)["link"].linkname == "../../../../tmp"
    assert _members(hostile_layer("hardlink_escape").tar)["evil-hardlink"].linkname == "../../etc/passwd"


def test_random_layer_is_deterministic_incompressible_and_fast() -> None:
    start = time.monotonic()
    layer = random_layer(8 * 1024 * 1024, seed=7)
    assert layer.digest == random_layer(8 * 1024 * 1024, seed=7).digest
    assert layer.digest != random_layer(8 * 1024 * 1024, seed=8).digest
    assert time.monotonic() - start < 5
    assert layer.size > 8 * 1024 * 1024  # random data does not compress
    contents = sum(m.size for m in _members(layer.tar).values())
    assert contents == 8 * 1024 * 1024


def test_user_images() -> None:
    for user in images.USER_IMAGE_USERS:
        assert json.loads(user_image(user).config_bytes())["config"]["User"] == user


# ----------------------------------------------------------------------------------------------
# Against the real registry
# ----------------------------------------------------------------------------------------------


def _get_manifest_raw(reg: Registry, repo: str, ref: str, auth: str | None = None) -> images.HttpResponse:
    """A plain GET, independent of RegistryClient's auth handling."""
    headers = {"Accept": ", ".join(images.ALL_MANIFEST_TYPES)}
    if auth:
        headers["Authorization"] = auth
    return RegistryClient.raw("GET", f"{reg.url}/v2/{repo}/manifests/{ref}", headers=headers)


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_image_to_plain_registry(plain: Registry, multi: Image, fmt: ManifestFormat) -> None:
    digest = push_image(plain, "pycri/multi", fmt, multi, fmt=fmt)
    assert digest == multi.manifest_digest(fmt)

    resp = _get_manifest_raw(plain, "pycri/multi", fmt)
    assert resp.status == 200
    assert resp.header("Docker-Content-Digest") == digest == _sha(resp.body)
    assert resp.header("Content-Type") == multi.manifest_media_type(fmt)
    assert resp.body == multi.manifest_bytes(fmt)
    by_digest = _get_manifest_raw(plain, "pycri/multi", digest)
    assert by_digest.status == 200 and by_digest.body == resp.body

    client = RegistryClient(plain)
    assert client.get_blob("pycri/multi", multi.config_digest) == multi.config_bytes()
    top = multi.layers[-1]
    assert client.get_blob("pycri/multi", top.digest) == top.blob


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_index_with_two_platforms(plain: Registry, multi: Image, fmt: ManifestFormat) -> None:
    entries = [(multi, platform) for platform in PLATFORMS]
    digest = push_index(plain, "pycri/multiarch", fmt, entries, fmt=fmt)
    assert digest == _sha(images.index_bytes(entries, fmt=fmt))

    resp = _get_manifest_raw(plain, "pycri/multiarch", fmt)
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == digest == _sha(resp.body)
    index = json.loads(resp.body)
    assert (
        index["mediaType"]
        == resp.header("Content-Type")
        == (OCI_INDEX if fmt == "oci" else DOCKER_MANIFEST_LIST)
    )
    assert [m["platform"] for m in index["manifests"]] == PLATFORMS

    client = RegistryClient(plain)
    for entry, platform in zip(index["manifests"], PLATFORMS, strict=True):
        body, media_type, child_digest = client.get_manifest("pycri/multiarch", entry["digest"])
        assert child_digest == entry["digest"] == _sha(body) and media_type == entry["mediaType"]
        config_digest = json.loads(body)["config"]["digest"]
        config = json.loads(client.get_blob("pycri/multiarch", config_digest))
        # push_index patched each child's config to the platform it is listed under.
        assert config["architecture"] == platform["architecture"]


def test_push_blob_and_raw_manifest(plain: Registry) -> None:
    digest = push_blob(plain, "pycri/raw", b"hello blob")
    assert digest == _sha(b"hello blob")
    assert RegistryClient(plain).get_blob("pycri/raw", digest) == b"hello blob"

    image = Image.build([random_layer(4096, seed=1, compression="none")], cmd=["true"])
    client = RegistryClient(plain)
    for layer in image.layers:
        client.push_blob("pycri/raw", layer.blob)
    client.push_blob("pycri/raw", image.config_bytes())
    # Non-canonical whitespace: the digest is of the exact bytes, which the registry keeps.
    body = json.dumps(image.manifest("oci"), indent=3).encode()
    assert push_raw_manifest(plain, "pycri/raw", "spaced", body, OCI_MANIFEST) == _sha(body)
    assert _get_manifest_raw(plain, "pycri/raw", "spaced").body == body

    # The registry validates manifests: a missing blob is refused, and that surfaces as an error.
    broken = json.dumps(
        {**image.manifest("oci"), "layers": [{**image.layers[0].descriptor(), "digest": _sha(b"x")}]}
    )
    with pytest.raises(RegistryError) as err:
        push_raw_manifest(plain, "pycri/raw", "broken", broken.encode(), OCI_MANIFEST)
    assert err.value.status == 400


def test_basic_auth_registry(basic: Registry, multi: Image) -> None:
    anonymous = RegistryClient.raw("GET", basic.url + "/v2/")
    assert anonymous.status == 401
    assert (anonymous.header("WWW-Authenticate") or "").startswith("Basic realm=")

    digest = push_image(basic, "pycri/basic", "v1", multi, fmt="oci")
    assert _get_manifest_raw(basic, "pycri/basic", "v1").status == 401
    assert basic.username and basic.password
    resp = _get_manifest_raw(basic, "pycri/basic", "v1", _basic(basic.username, basic.password))
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == digest == _sha(resp.body)

    with pytest.raises(RegistryError) as err:
        RegistryClient(basic, password="wrong").get_manifest("pycri/basic", "v1")
    assert err.value.status == 401


def test_token_auth_registry(token: Registry, multi: Image) -> None:
    server = token.token_server
    assert server is not None and token.username and token.password

    anonymous = RegistryClient.raw("GET", token.url + "/v2/")
    assert anonymous.status == 401
    scheme, challenge = images.parse_challenge(anonymous.header("WWW-Authenticate") or "")
    assert scheme == "bearer" and challenge["realm"] == server.realm
    assert challenge["service"] == server.service

    # Anonymous token requests are refused (anonymous_pull defaults to False)...
    denied_before = server.denied
    query = urllib.parse.urlencode({"service": server.service, "scope": "repository:pycri/token:pull"})
    token_url = f"{server.realm}?{query}"
    assert RegistryClient.raw("GET", token_url).status == 401
    assert RegistryClient.raw("GET", token_url, headers={"Authorization": _basic("x", "y")}).status == 401
    assert server.denied == denied_before + 2

    # ...and pushing with credentials goes through the token flow.
    issued_before = server.tokens_issued
    client = RegistryClient(token)
    digest = client.push_image("pycri/token", "v1", multi, fmt="docker")
    assert digest == multi.manifest_digest("docker")
    assert client.token_fetches >= 1 and server.tokens_issued == issued_before + client.token_fetches
    # The registry asks for "pull,push" or "push,pull" depending on the endpoint.
    pushed = [s for s in server.snapshot().scopes if s.startswith("repository:pycri/token:")]
    assert any("push" in scope.rsplit(":", 1)[1].split(",") for scope in pushed)

    # Without a token the manifest is refused; with one fetched by hand it matches.
    assert _get_manifest_raw(token, "pycri/token", "v1").status == 401
    reply = RegistryClient.raw(
        "GET", token_url, headers={"Authorization": _basic(token.username, token.password)}
    )
    assert reply.status == 200
    doc = json.loads(reply.body)
    assert doc["token"] == doc["access_token"] and doc["expires_in"] == 300
    resp = _get_manifest_raw(token, "pycri/token", "v1", "Bearer " + doc["token"])
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == digest == _sha(resp.body)

    # A pull-scoped token does not allow pushing.
    pull_only = {"Authorization": "Bearer " + doc["token"]}
    upload = RegistryClient.raw("POST", f"{token.url}/v2/pycri/token/blobs/uploads/", b"", pull_only)
    assert upload.status == 401


def test_token_anonymous_pull_with_kid_header(tmp_path: Path) -> None:
    # The other way of naming the signing key (libtrust "kid" instead of "x5c"), plus the
    # anonymous_pull switch: anonymous clients may pull but not push.
    with running_registry(tmp_path, auth="token", anonymous_pull=True, key_ref="kid") as reg:
        assert reg.token_server is not None
        digest = push_image(reg, "pycri/anon", "v1", user_image("www-data"))
        anonymous = RegistryClient(reg, anonymous=True)
        body, _, header_digest = anonymous.get_manifest("pycri/anon", "v1")
        assert header_digest == digest == _sha(body)
        assert reg.token_server.snapshot().anonymous_tokens >= 1
        with pytest.raises(RegistryError) as err:
            anonymous.push_blob("pycri/anon", b"not allowed")
        assert err.value.status == 401


def test_stop_cleans_up_and_is_idempotent(tmp_path: Path) -> None:
    reg = start_registry(tmp_path)
    proc, root = reg.process, reg.root
    assert proc is not None and root is not None and root.exists() and reg.running
    reg.stop()
    reg.stop()
    assert proc.poll() is not None and not root.exists() and not reg.running
    assert (tmp_path / "registry.log").exists()  # kept for diagnosis
    with pytest.raises(OSError):
        RegistryClient.raw("GET", reg.url + "/v2/")


# Run by test_registry_dies_with_a_killed_test_process in a separate interpreter. It is a
# child subreaper, so the registry orphaned by the SIGKILLed "test process" is re-parented
# to it (not to PID 1) and can be reaped here: that proves the registry died, and leaves no
# zombie behind whatever PID 1 does.
_SUPERVISOR = """
import ctypes, os, signal, subprocess, sys, time
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
victim = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
pid = int(victim.stdout.readline())
victim.wait()
print("victim", victim.returncode, flush=True)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == pid:
        print("registry reaped", flush=True)
        break
    time.sleep(0.05)
else:
    os.kill(pid, signal.SIGKILL)  # our own orphan: clean up, then report the failure
    os.waitpid(pid, 0)
    print("registry outlived the test process", flush=True)
"""

_VICTIM = """
import os, signal, sys
from pathlib import Path
from tests.support.registry import start_registry
reg = start_registry(Path(sys.argv[1]))
print(reg.process.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_registry_dies_with_a_killed_test_process(tmp_path: Path) -> None:
    # A test run killed by SIGKILL runs no teardown and no atexit; PR_SET_PDEATHSIG must
    # still take the registry down with it.
    repo_root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR, _VICTIM, str(tmp_path)],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.splitlines() == ["victim -9", "registry reaped"], result.stdout + result.stderr


def test_start_failure_reports_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "REGISTRY_BINARY", "/bin/false")
    with pytest.raises(RegistryStartError, match="did not come up"):
        start_registry(tmp_path, startup_timeout=2)
    assert not any(p.name.startswith("registry-") and p.is_dir() for p in tmp_path.iterdir())


def test_client_refuses_non_loopback_hosts() -> None:
    # Checked before any socket is opened.
    for url in ("http://10.0.0.1/v2/", "https://127.0.0.1/v2/", "http://localhost/v2/"):
        with pytest.raises(ValueError, match="refusing"):
            RegistryClient.raw("GET", url)
