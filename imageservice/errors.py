"""Domain errors of pycri and the gRPC status code each one maps to.

Managers and adapters raise these; the servicers turn them into gRPC statuses in one
place (``cri_runtime.server`` interceptor). The code lives on the class so that the
mapping cannot drift from the error's meaning.
"""

from __future__ import annotations

import grpc


class PycriError(Exception):
    """Base of every error pycri reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(PycriError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PycriError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(PycriError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PycriError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(PycriError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PycriError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(PycriError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PycriError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(PycriError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(PycriError):
    """Content that does not match what it claims to be (digest, size, diff ID)."""

    code = grpc.StatusCode.DATA_LOSS


class HostileContent(InvalidArgument):
    """An archive entry that would escape its layer or otherwise attack the host."""


class Unimplemented(PycriError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(PycriError):
    code = grpc.StatusCode.INTERNAL
