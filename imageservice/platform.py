"""Which manifest of a multi-platform index this host runs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cri_runtime.errors import InvalidArgument

_MACHINE_TO_PLATFORM = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "s390x": ("s390x", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "ppc64le": ("ppc64le", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, candidate: dict) -> bool:
        if candidate.get("os", "") != self.os or candidate.get("architecture", "") != self.architecture:
            return False
        variant = candidate.get("variant", "")
        # arm64 images are published with and without "v8"; both run on an arm64 host.
        if self.architecture == "arm64":
            return variant in ("", "v8")
        return not self.variant or variant in ("", self.variant)


def host_platform(override: str = "") -> Platform:
    """This host's platform, or ``override`` ("os/arch[/variant]") from the configuration."""
    if override:
        parts = override.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"image.platform {override!r}: want os/arch or os/arch/variant")
        return Platform(*parts)
    machine = os.uname().machine
    if machine not in _MACHINE_TO_PLATFORM:
        raise InvalidArgument(f"unsupported machine {machine!r}: set image.platform in the configuration")
    arch, variant = _MACHINE_TO_PLATFORM[machine]
    return Platform("linux", arch, variant)


def describe(candidate: dict) -> str:
    return "/".join(
        p
        for p in (candidate.get("os", "?"), candidate.get("architecture", "?"), candidate.get("variant", ""))
        if p
    )
