"""Reference normalisation, as Docker and containerd do it."""

from __future__ import annotations

import pytest

from cri_runtime.errors import InvalidArgument
from imageservice.reference import parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("someone/tool:v2", "docker.io/someone/tool:v2"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
        ("localhost/app", "localhost/app:latest"),
        ("127.0.0.1:5000/team/app:1.0", "127.0.0.1:5000/team/app:1.0"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"127.0.0.1:5000/app:1@{DIGEST}", f"127.0.0.1:5000/app:1@{DIGEST}"),
    ],
)
def test_references_normalise_like_docker(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


def test_digest_wins_over_tag_for_what_is_pulled() -> None:
    ref = parse_reference(f"127.0.0.1:5000/app:1@{DIGEST}")
    assert ref.pull_reference == DIGEST
    assert ref.tagged == "127.0.0.1:5000/app:1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Busybox",
        "busy box",
        "a/b:",
        "a//b",
        "app@sha256:short",
        "app@md5:" + "a" * 32,
        "-app",
        "x:t@",
    ],
)
def test_malformed_references_are_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)
