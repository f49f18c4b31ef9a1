"""Settings of the image side: registries, limits, platform."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cri_runtime.errors import InvalidArgument


@dataclass(frozen=True)
class RegistryHost:
    """What the configuration says about one registry host (or ``"*"`` for all)."""

    mirrors: tuple[str, ...] = ()
    mirrors_only: bool = False
    insecure: bool = False
    username: str = ""
    password: str = ""
    auth: str = ""  # base64 of "user:password", as in a docker config.json

    @classmethod
    def from_table(cls, host: str, table: dict[str, Any]) -> RegistryHost:
        known = {"mirrors", "mirrors_only", "insecure", "username", "password", "auth"}
        unknown = set(table) - known
        if unknown:
            raise InvalidArgument(f"registries.{host!r}: unknown keys {sorted(unknown)}")
        mirrors = table.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise InvalidArgument(f"registries.{host!r}.mirrors must be a list of URLs")
        for mirror in mirrors:
            if not mirror.startswith(("http://", "https://")):
                raise InvalidArgument(
                    f"registries.{host!r}.mirrors: {mirror!r} must start with http:// or https://"
                )
        return cls(
            mirrors=tuple(m.rstrip("/") for m in mirrors),
            mirrors_only=bool(table.get("mirrors_only", False)),
            insecure=bool(table.get("insecure", False)),
            username=str(table.get("username", "")),
            password=str(table.get("password", "")),
            auth=str(table.get("auth", "")),
        )


@dataclass(frozen=True)
class ImageConfig:
    max_concurrent_downloads: int = 3
    # Manifests, indexes and configs are small JSON documents; a registry that sends
    # more is broken or hostile, so we stop reading at this bound.
    max_metadata_bytes: int = 4 * 1024 * 1024
    # A pull that receives no bytes for this long is cancelled (CRI-O's pull_progress_timeout).
    pull_progress_timeout: float = 60.0
    # "os/arch[/variant]"; empty means this host's.
    platform: str = ""
    # Names (tags or repo digests) of images reported as pinned, so kubelet never collects them.
    pinned_images: tuple[str, ...] = ()
    registries: dict[str, RegistryHost] = field(default_factory=dict)

    def registry(self, host: str) -> RegistryHost:
        """Settings for ``host``: its own table, else the ``"*"`` table, else defaults."""
        if host in self.registries:
            return self.registries[host]
        return self.registries.get("*", RegistryHost())
