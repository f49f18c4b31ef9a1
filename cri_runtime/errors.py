"""Domain errors of pycri.

Managers and adapters raise these; they know nothing of gRPC. The servicer layer turns each one
into a gRPC status in one place (``cri_runtime.cri.status``).
"""

from __future__ import annotations


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
