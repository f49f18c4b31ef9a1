"""Image references, normalised the way Docker and containerd do it.

``busybox`` is ``docker.io/library/busybox:latest``; ``host:5000/a/b:t@sha256:...`` keeps
its host, tag and digest. When both a tag and a digest are given the digest decides what is
pulled and the tag is only a name, as in containerd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cri_runtime.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
# The host that actually serves docker.io's registry API.
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)  # Python's \w alone takes "ô" too
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """``domain/path``: the name an image's tags and repo digests hang from."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def tagged(self) -> str | None:
        return f"{self.repository}:{self.tag}" if self.tag else None

    @property
    def pull_reference(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest wins."""
        return self.digest or self.tag or "latest"


def validate_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"invalid digest {digest!r}")
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256":
        raise InvalidArgument(f"unsupported digest algorithm {algorithm!r} in {digest!r}: only sha256")
    if not _SHA256_HEX.fullmatch(hexpart):
        raise InvalidArgument(f"invalid sha256 digest {digest!r}: want 64 lowercase hex digits")
    return digest


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raise InvalidArgument naming what is wrong."""
    if not text or not text.strip():
        raise InvalidArgument("image reference is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidArgument(f"image reference {text!r} contains white space")
    remainder = text
    digest = None
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        validate_digest(digest)
    tag = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid tag {tag!r} in image reference {text!r}")
    if not remainder:
        raise InvalidArgument(f"image reference {text!r} has no repository name")
    if len(remainder) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"repository name in {text!r} is longer than {MAX_NAME_LENGTH} characters")
    first, sep, rest = remainder.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        domain, path = first, rest
        if not _DOMAIN.fullmatch(domain):
            raise InvalidArgument(f"invalid registry host {domain!r} in image reference {text!r}")
    else:
        domain, path = DEFAULT_DOMAIN, remainder
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise InvalidArgument(
                f"invalid repository name {path!r} in image reference {text!r}: "
                "components must be lowercase letters, digits and separators (. _ __ -)"
            )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def looks_like_image_id(text: str) -> bool:
    """A bare ``sha256:<hex>`` or 64-hex string names an image by ID, not by reference."""
    hexpart = text.removeprefix("sha256:")
    return bool(_SHA256_HEX.fullmatch(hexpart))


def endpoint_host(domain: str) -> str:
    return DOCKER_HUB_ENDPOINT if domain == DEFAULT_DOMAIN else domain
