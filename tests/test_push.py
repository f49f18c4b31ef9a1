"""``pycri push``: a committed image goes to the test registry with only its new blobs uploaded
(the base layers are mounted from the repository they were pulled from), chunked when big,
and comes back by pull with the same digests."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.pods import Env, wait_exited
from tests.support.registry import Registry, start_registry
from tests.test_commit import pycri

pytestmark = pytest.mark.root


def _pycri_requests(registry: Registry, since: int) -> list[tuple[str, str, int]]:
    """(method, path, status) of the requests pycri sent, from the registry's access log."""
    assert registry.log_path is not None
    text = registry.log_path.read_text()[since:]
    pattern = re.compile(r'"(HEAD|GET|POST|PUT|PATCH) (\S+) HTTP/1\.1" (\d+) .*"pycri/[^"]*"$', re.M)
    return [(m.group(1), m.group(2), int(m.group(3))) for m in pattern.finditer(text)]


def _log_size(registry: Registry) -> int:
    assert registry.log_path is not None
    return len(registry.log_path.read_text())


def test_push_of_a_commit_uploads_only_the_new_layer_and_config_and_pulls_back(
    env: Env, registry: Registry
) -> None:
    pod = env.pod("push")
    # Random bytes do not compress: the new layer is bigger than the chunk size below.
    cid = env.run(pod, "writer", ["sh", "-c", "head -c 300000 /dev/urandom > /random; echo pushed > /note"])
    wait_exited(env.cri, cid)
    target = f"{registry.host}/test/committed-{env.daemon.workdir.name}:1"
    committed = pycri(env, "commit", cid, target)
    assert committed.returncode == 0, committed.stderr
    image_id = committed.stdout.split()[0]
    parent_layers = 2  # the pod image: busybox and one more (conftest.pod_image)

    mark = _log_size(registry)
    pushed = pycri(env, "push", "--chunk-size", "65536", target)
    assert pushed.returncode == 0, pushed.stderr
    # "<ref>@<digest>: uploaded U, mounted M, already present P"
    summary = re.search(
        r"@(sha256:[0-9a-f]{64}): uploaded (\d+), mounted (\d+), already present (\d+)", pushed.stdout
    )
    assert summary, pushed.stdout
    digest = summary.group(1)
    assert (int(summary.group(2)), int(summary.group(3)), int(summary.group(4))) == (2, parent_layers, 0)
    requests = _pycri_requests(registry, mark)
    # Uploads: the new layer in PATCH chunks, the config in one PUT; the base layers by mount.
    assert sum(1 for m, _, s in requests if m == "PATCH" and s == 202) >= 4
    mounts = [p for m, p, s in requests if m == "POST" and "mount=" in p and s == 201]
    assert len(mounts) == parent_layers
    assert [s for m, p, s in requests if m == "PUT" and "/manifests/" in p] == [201]

    # Pushed again: everything is there, nothing is sent but HEADs and the manifest.
    mark = _log_size(registry)
    again = pycri(env, "push", target)
    assert again.returncode == 0, again.stderr
    assert f"uploaded 0, mounted 0, already present {parent_layers + 2}" in again.stdout
    assert not [r for r in _pycri_requests(registry, mark) if r[0] in ("POST", "PATCH")]

    # Pulled back after removal: the same image, with the pushed manifest as its repo digest.
    env.cri.remove_container(cid)
    env.cri.remove_image(target)
    assert env.cri.pull(target) == image_id
    status = env.cri.image_status(target).image
    assert f"{registry.host}/test/committed-{env.daemon.workdir.name}@{digest}" in status.repo_digests
    reader = env.cri.create_container(pod, "reader", target, command=["cat", "/note"], log_path="r.log")
    env.cri.start_container(reader)
    assert wait_exited(env.cri, reader).exit_code == 0
    assert (env.logs / "push" / "r.log").read_text().endswith("pushed\n")


def test_push_to_an_unreachable_registry_is_unavailable_and_names_it(env: Env) -> None:
    images_before = {(i.id, tuple(i.repo_tags)) for i in env.cri.list_images()}
    result = pycri(env, "push", env.image, "127.0.0.1:1/nowhere/image:1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "127.0.0.1:1" in result.stderr, result.stderr
    assert {(i.id, tuple(i.repo_tags)) for i in env.cri.list_images()} == images_before


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_push_with_credentials_and_without(
    env: Env, tmp_path_factory: pytest.TempPathFactory, auth: str
) -> None:
    with start_registry(tmp_path_factory.mktemp("authreg"), auth=auth) as registry:  # type: ignore[arg-type]
        target = f"{registry.host}/auth/image:1"
        pod_image_id = env.cri.image_status(env.image).image.id
        tagged = pycri(env, "image", "tag", env.image, target)
        assert tagged.returncode == 0, tagged.stderr
        refused = pycri(env, "push", target)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
        assert registry.password is not None
        pushed = pycri(
            env, "push", "--username", "pycri", "--password-stdin", target, stdin=registry.password + "\n"
        )
        assert pushed.returncode == 0, pushed.stderr
        assert "uploaded 3" in pushed.stdout  # two layers and the config: another registry has none
        env.cri.remove_image(target)
        pulled = env.cri.pull(target, username="pycri", password=registry.password)
        assert pulled == pod_image_id


class _Misbehaving(BaseHTTPRequestHandler):
    """A registry that claims every blob (HEAD 200) or takes uploads and then fails them."""

    mode = "lies"
    seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_HEAD(self) -> None:
        self.seen.append(f"HEAD {self.path}")
        if self.mode == "lies":
            self.send_response(200)  # no size given: a claim pycri cannot check until the manifest
            self.end_headers()
            return
        self._answer(404)

    def do_POST(self) -> None:
        self.seen.append(f"POST {self.path}")
        self._drain()
        self._answer(202, {"Location": "/v2/upload/1"})

    def do_PUT(self) -> None:
        self.seen.append(f"PUT {self.path}")
        self._drain()
        if "/manifests/" in self.path and self.mode == "lies":
            body = json.dumps({"errors": [{"code": "MANIFEST_BLOB_UNKNOWN", "message": "blob unknown"}]})
            self._answer(400, {"Content-Type": "application/json"}, body.encode())
            return
        self._answer(
            500,
            {"Content-Type": "application/json"},
            b'{"errors":[{"code":"UNKNOWN","message":"disk full"}]}',
        )


@pytest.mark.parametrize("mode", ["lies", "fails"])
def test_a_registry_that_lies_or_fails_halfway_leaves_the_store_as_it_was(
    env: Env, registry: Registry, mode: str
) -> None:
    _Misbehaving.mode = mode
    _Misbehaving.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        images_before = {(i.id, tuple(i.repo_tags), tuple(i.repo_digests)) for i in env.cri.list_images()}
        layers_before = sorted(p.name for p in (env.daemon.root / "layers").iterdir())
        target = f"127.0.0.1:{server.server_address[1]}/bad/image:1"
        result = pycri(env, "push", env.image, target)
        assert result.returncode == 1
        if mode == "lies":
            assert "INVALID_ARGUMENT" in result.stderr and "MANIFEST_BLOB_UNKNOWN" in result.stderr
        else:
            assert "UNAVAILABLE" in result.stderr and "disk full" in result.stderr, result.stderr
            assert not any(line.startswith("PUT /v2/bad/image/manifests") for line in _Misbehaving.seen)
        assert f"127.0.0.1:{server.server_address[1]}" in result.stderr
        assert {
            (i.id, tuple(i.repo_tags), tuple(i.repo_digests)) for i in env.cri.list_images()
        } == images_before
        assert sorted(p.name for p in (env.daemon.root / "layers").iterdir()) == layers_before
    finally:
        server.shutdown()
        server.server_close()
    # The store is intact: the same image pushes to a registry that works.
    retried = pycri(env, "push", env.image, f"{registry.host}/test/after-failure-{mode}:1")
    assert retried.returncode == 0, retried.stderr
