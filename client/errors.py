"""Errors the SDK raises. Every daemon status becomes one of these, with the daemon's message.

Each carries ``.reason`` (kvstore.core.errors.Reason), the daemon's machine-readable why, and
``.status_code`` (the grpc.StatusCode, None for errors the SDK raised itself). Branch on
``.reason``; the message text is for people and may change in any release.
"""
from __future__ import annotations

import grpc

from kvstore.core.errors import (REASON_METADATA_KEY, FailedPrecondition, InvalidArgument,
                            KVStoreError, NotFound, PermissionDenied, Reason, ResourceExhausted,
                            Unauthenticated, Unavailable)


class StaleRead(FailedPrecondition):
    """A lease expired before release: the bytes read may have been overwritten, discard them."""

    default_reason = Reason.EXPIRED_LEASE


class Timeout(Unavailable):
    """The daemon did not answer within the deadline."""

    default_reason = Reason.TIMEOUT


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Unavailable,
}

# A status without a kvstore-reason (from gRPC itself: the daemon is away, a deadline passed,
# the channel was closed) gets the reason its code implies.
_TRANSPORT_REASON = {
    grpc.StatusCode.UNAVAILABLE: Reason.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: Reason.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Reason.TIMEOUT,
    grpc.StatusCode.UNAUTHENTICATED: Reason.UNAUTHENTICATED,
}


def reason_of(exc: grpc.RpcError) -> Reason:
    """The daemon's reason for a failed call (its ``kvstore-reason`` trailing metadata)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == REASON_METADATA_KEY:
            return Reason.parse(value.decode() if isinstance(value, bytes) else value)
    code = exc.code() if hasattr(exc, "code") else None
    return _TRANSPORT_REASON.get(code, Reason.UNSPECIFIED)


def from_rpc_error(exc: grpc.RpcError) -> KVStoreError:
    code = exc.code() if hasattr(exc, "code") else None
    cls = _BY_CODE.get(code, KVStoreError)
    err = cls(f"{exc.details() if hasattr(exc, 'details') else exc} [{code.name if code else '?'}]",
              reason_of(exc))
    err.status_code = code
    return err


__all__ = ["KVStoreError", "InvalidArgument", "NotFound", "FailedPrecondition",
           "ResourceExhausted", "Unavailable", "PermissionDenied", "Unauthenticated",
           "StaleRead", "Timeout", "Reason", "from_rpc_error", "reason_of"]
