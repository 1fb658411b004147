"""Errors the SDK raises. Every daemon status becomes one of these, with the daemon's message."""
from __future__ import annotations

import grpc

from kvstore.errors import (FailedPrecondition, InvalidArgument, KVStoreError, NotFound,
                            PermissionDenied, ResourceExhausted, Unavailable)


class StaleRead(FailedPrecondition):
    """A lease expired before release: the bytes read may have been overwritten, discard them."""


class Timeout(Unavailable):
    """The daemon did not answer within the deadline."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Unavailable,
}


def from_rpc_error(exc: grpc.RpcError) -> KVStoreError:
    code = exc.code() if hasattr(exc, "code") else None
    cls = _BY_CODE.get(code, KVStoreError)
    err = cls(f"{exc.details() if hasattr(exc, 'details') else exc} [{code.name if code else '?'}]")
    err.status_code = code
    return err


__all__ = ["KVStoreError", "InvalidArgument", "NotFound", "FailedPrecondition",
           "ResourceExhausted", "Unavailable", "PermissionDenied", "StaleRead", "Timeout",
           "from_rpc_error"]
