"""Ending a gRPC call with a domain error: its status code, message and reason (the trailing
``kvstore-reason`` metadata, kvstore.core.errors). Used by the access layer and the servicer."""
from __future__ import annotations

import grpc

from kvstore.core.errors import KVStoreError, reason_metadata


async def abort(context, err: KVStoreError):
    """End the call (grpc.aio servicer context) with ``err``'s status, message and reason."""
    await context.abort(getattr(grpc.StatusCode, err.code), str(err),
                        trailing_metadata=reason_metadata(err.reason))
