"""Domain errors and their machine-readable reasons, shared by the daemon and the SDK.

Every error the daemon answers carries a gRPC status code (the class's ``code``), a message for a
person, and a **reason** (``Reason``, below) for programs. The reason travels as the trailing
metadata entry ``kvstore-reason`` (ASCII, the Reason's name); the SDK turns it back into
``exc.reason`` (kvstore.client.errors). Code branches on the reason, never on the message: the
wording may change in any release, the reason names may not (a new one may be added; a client
that does not know it sees ``Reason.UNSPECIFIED``).

This module imports nothing heavy: the SDK imports it without the daemon's parts.
"""
from __future__ import annotations

import enum

REASON_METADATA_KEY = "kvstore-reason"


class Reason(str, enum.Enum):
    """Why a call failed. The value is the name: stable across releases, safe to compare."""

    UNSPECIFIED = "UNSPECIFIED"            # no reason sent (an older daemon, or a transport error)
    # -- the request ---------------------------------------------------------------------------
    BAD_ARGUMENT = "BAD_ARGUMENT"          # a field is out of range or inconsistent
    BAD_KEYS = "BAD_KEYS"                  # keys malformed (length), duplicated in a batch
    BAD_LAYOUT = "BAD_LAYOUT"              # the declared KVLayout is invalid or too large
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"    # more blocks than max_batch_blocks
    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # the bytes do not parse as the request message
    # -- state the request names -----------------------------------------------------------
    UNKNOWN_SESSION = "UNKNOWN_SESSION"    # session ended or never opened (daemon restarted)
    UNKNOWN_NAMESPACE = "UNKNOWN_NAMESPACE"  # not registered (or another tenant's)
    LAYOUT_MISMATCH = "LAYOUT_MISMATCH"    # the model is registered with another layout
    EXPIRED_LEASE = "EXPIRED_LEASE"        # the lease expired before release: discard the bytes
    UNKNOWN_LEASE = "UNKNOWN_LEASE"        # released already, or never granted
    UNKNOWN_ALLOCATION = "UNKNOWN_ALLOCATION"  # committed already, expired, or never granted
    NOT_ENABLED = "NOT_ENABLED"            # the feature is off in this daemon (e.g. prefetch)
    # -- capacity and limits ---------------------------------------------------------------
    NO_ROOM = "NO_ROOM"                    # the tier is full of leased blocks
    OVER_LIMIT = "OVER_LIMIT"              # this client is over a per-client limit
    # -- access ------------------------------------------------------------------------------
    UNAUTHENTICATED = "UNAUTHENTICATED"    # missing or invalid bearer token
    TENANT_DENIED = "TENANT_DENIED"        # the token may not use that tenant salt
    ARENA_NOT_TRUSTED = "ARENA_NOT_TRUSTED"  # shared memory / HBM not granted (arena_tenants)
    # -- the daemon and the transport ------------------------------------------------------
    INTERNAL = "INTERNAL"                  # a bug: see the daemon log
    UNAVAILABLE = "UNAVAILABLE"            # daemon away, restarting, or the call was cancelled
    TIMEOUT = "TIMEOUT"                    # no answer within the deadline

    @classmethod
    def parse(cls, name: str | None) -> "Reason":
        """The Reason named ``name``; UNSPECIFIED for None or a name this version does not know."""
        try:
            return cls(name) if name else cls.UNSPECIFIED
        except ValueError:
            return cls.UNSPECIFIED


class KVStoreError(Exception):
    """Base of every kvstore error: ``code`` (a gRPC status name), ``reason`` and the message."""

    code = "INTERNAL"
    default_reason = Reason.INTERNAL

    def __init__(self, message: str = "", reason: Reason | None = None):
        super().__init__(message)
        self.reason = Reason(reason) if reason is not None else self.default_reason


class InvalidArgument(KVStoreError):
    code = "INVALID_ARGUMENT"
    default_reason = Reason.BAD_ARGUMENT


class NotFound(KVStoreError):
    code = "NOT_FOUND"
    default_reason = Reason.UNSPECIFIED


class FailedPrecondition(KVStoreError):
    code = "FAILED_PRECONDITION"
    default_reason = Reason.UNSPECIFIED


class ResourceExhausted(KVStoreError):
    code = "RESOURCE_EXHAUSTED"
    default_reason = Reason.OVER_LIMIT


class Unavailable(KVStoreError):
    code = "UNAVAILABLE"
    default_reason = Reason.UNAVAILABLE


class PermissionDenied(KVStoreError):
    code = "PERMISSION_DENIED"
    default_reason = Reason.TENANT_DENIED


class Unauthenticated(PermissionDenied):
    code = "UNAUTHENTICATED"
    default_reason = Reason.UNAUTHENTICATED


def reason_metadata(reason: Reason) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries ``reason`` on an error status."""
    return ((REASON_METADATA_KEY, Reason(reason).value),)


class ConfigError(ValueError):
    """A configuration value that cannot be used (the CLI answers exit code 2 and the
    message, which says what to change)."""
