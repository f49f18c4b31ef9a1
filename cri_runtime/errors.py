"""Domain errors of pycri.

Managers and adapters raise these; they know nothing of gRPC. The servicer layer turns each one
into a gRPC status in one place (``cri_runtime.cri.status``).
"""

from __future__ import annotations

import errno


class PycriError(Exception):
    """Base of every error pycri reports to a caller (INTERNAL unless a subclass says more)."""


class InvalidArgument(PycriError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""


class NotFound(PycriError):
    pass


class AlreadyExists(PycriError):
    pass


class FailedPrecondition(PycriError):
    """The request is fine but the host or the object is not in a state to serve it
    (a binary missing, a pod not ready): a person must act before a retry can succeed."""


class Unavailable(PycriError):
    """A transient problem (a registry down, a lock busy): retrying later may succeed."""


class DeadlineExceeded(PycriError):
    pass


class Unauthenticated(PycriError):
    pass


class PermissionDenied(PycriError):
    pass


class ResourceExhausted(PycriError):
    pass


class DataLoss(PycriError):
    """Content that does not match what it claims to be (digest, size, diff ID)."""


class HostileContent(InvalidArgument):
    """An archive entry that would escape its layer or otherwise attack the host."""


class Unimplemented(PycriError):
    pass


class Internal(PycriError):
    pass


_ERRNO_CLASSES: dict[int, type[PycriError]] = {
    errno.EINVAL: InvalidArgument,  # the kernel refused the value itself
    errno.ERANGE: InvalidArgument,
    errno.EDOM: InvalidArgument,
    errno.ENOENT: FailedPrecondition,  # a file or controller the host should have is missing
    errno.ENOTDIR: FailedPrecondition,
    errno.ENODEV: FailedPrecondition,
    errno.ENOEXEC: FailedPrecondition,
    errno.EACCES: FailedPrecondition,  # root lacks a capability or a file is locked down
    errno.EPERM: FailedPrecondition,
    errno.EROFS: FailedPrecondition,
    errno.EOPNOTSUPP: FailedPrecondition,
    errno.ENOSPC: ResourceExhausted,
    errno.ENOMEM: ResourceExhausted,
    errno.EMFILE: ResourceExhausted,
    errno.ENFILE: ResourceExhausted,
    errno.EDQUOT: ResourceExhausted,
    errno.EBUSY: Unavailable,  # transient: a retry may succeed
    errno.EAGAIN: Unavailable,
    errno.EINTR: Unavailable,
    errno.ETIMEDOUT: DeadlineExceeded,
}


def from_os_error(exc: OSError, doing: str) -> PycriError:
    """A domain error for ``exc`` met while ``doing`` something, chosen by its errno.

    A value the kernel rejects is the caller's mistake (InvalidArgument); a missing file or a
    permission problem is the host's (FailedPrecondition, so that clients do not retry forever);
    exhaustion is ResourceExhausted; EBUSY/EAGAIN are Unavailable; anything else is Internal.
    """
    cls = _ERRNO_CLASSES.get(exc.errno or 0, Internal)
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return cls(f"{doing}: {reason}{where}")
