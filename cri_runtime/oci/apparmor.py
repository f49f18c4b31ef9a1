"""Which AppArmor profile a container runs under (the spec's ``process.apparmorProfile``).

The choice containerd 2.x makes:
- the ``apparmor`` SecurityProfile wins over the deprecated ``apparmor_profile`` string, whose
  forms are ``runtime/default``, ``unconfined`` and ``localhost/<name>``; neither set means the
  runtime's default;
- RuntimeDefault is ``pycri-default``, except for a privileged container, which the CRI runs
  without AppArmor confinement; Unconfined sets no profile; Localhost names a profile that must
  already be loaded (kubelet or the node's administrator loads it), and applies to privileged
  containers too, since it was asked for by name;
- where AppArmor is off, RuntimeDefault and Unconfined set nothing, and a Localhost profile is
  refused: running the container unconfined would silently drop the confinement asked for.

A profile name is refused when it is empty, holds whitespace or control characters, or a "/"
(which would reach a child profile or hat, "name//child", or name an attachment path rather than a
profile kubelet loaded).
"""

from __future__ import annotations

import re

from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.host import apparmor as host_apparmor
from cri_runtime.model import ContainerSecurity, SecurityProfile

DEFAULT_PROFILE = host_apparmor.DEFAULT_PROFILE
LOCALHOST_PREFIX = "localhost/"
# The deprecated string field's forms.
RUNTIME_DEFAULT = "runtime/default"
UNCONFINED = "unconfined"
# Printable, no whitespace, no "/"; AppArmor itself allows more, kubelet's profile names less.
_NAME = re.compile(r"[A-Za-z0-9_.:@+=-][A-Za-z0-9_.:@+=~-]*")
MAX_NAME = 255


def requested_profile(security: ContainerSecurity) -> SecurityProfile | None:
    """The profile the config asks for (None: it names none), from either field."""
    if security.apparmor is not None:
        return security.apparmor
    legacy = security.apparmor_profile
    if not legacy:
        return None
    if legacy == RUNTIME_DEFAULT:
        return SecurityProfile("runtime_default")
    if legacy == UNCONFINED:
        return SecurityProfile("unconfined")
    if legacy.startswith(LOCALHOST_PREFIX):
        return SecurityProfile("localhost", legacy)
    raise InvalidArgument(
        f"linux.security_context.apparmor_profile {legacy!r} is not runtime/default, unconfined "
        "or localhost/<profile>"
    )


def localhost_name(ref: str, field: str) -> str:
    """The profile name of a Localhost reference ("name" or "localhost/name"), validated."""
    name = ref.removeprefix(LOCALHOST_PREFIX)
    if not name:
        raise InvalidArgument(f"{field}: a Localhost AppArmor profile needs a name")
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{field} {ref!r} is not an AppArmor profile name (letters, digits and _ . : @ + = ~ -, "
            "no spaces or slashes)"
        )
    return name


def container_profile(security: ContainerSecurity, *, enabled: bool | None = None) -> str | None:
    """process.apparmorProfile for a container, or None to set none. ``enabled`` says whether
    AppArmor is on (None: ask the kernel); whether a Localhost profile is loaded is always read
    from the kernel. Raises InvalidArgument for a malformed request and FailedPrecondition for a
    profile this host cannot apply."""
    profile = requested_profile(security)
    field = (
        "linux.security_context.apparmor.localhost_ref"
        if security.apparmor is not None
        else "linux.security_context.apparmor_profile"
    )
    name = localhost_name(profile.localhost_ref, field) if profile and profile.kind == "localhost" else ""
    if enabled is None:
        enabled = host_apparmor.enabled()
    if not enabled:
        if name:
            raise FailedPrecondition(
                f"{field}: AppArmor profile {name!r} was asked for, but AppArmor is not enabled on this host"
            )
        return None
    if profile is None or profile.kind == "runtime_default":
        return None if security.privileged else DEFAULT_PROFILE
    if profile.kind == "unconfined":
        return None
    if not host_apparmor.is_loaded(name):
        raise FailedPrecondition(f"{field}: AppArmor profile {name!r} is not loaded on this host")
    return name


def ensure_loaded(profile: str | None) -> None:
    """Load pycri's default profile again if the container's profile is it and it is gone (an
    AppArmor reload removes every profile); a container never starts unconfined instead."""
    if profile == DEFAULT_PROFILE and not host_apparmor.is_loaded(DEFAULT_PROFILE):
        host_apparmor.ensure_default()
