"""Domain errors. Each maps to one gRPC status code in the servicer; the message is for a user."""
from __future__ import annotations


class KVStoreError(Exception):
    code = "INTERNAL"


class InvalidArgument(KVStoreError):
    code = "INVALID_ARGUMENT"


class NotFound(KVStoreError):
    code = "NOT_FOUND"


class FailedPrecondition(KVStoreError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(KVStoreError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(KVStoreError):
    code = "UNAVAILABLE"


class PermissionDenied(KVStoreError):
    code = "PERMISSION_DENIED"
