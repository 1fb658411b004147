"""kvstore client SDK: ``from kvstore.client import KVClient, KVLayout``."""
from kvstore.client.errors import (FailedPrecondition, InvalidArgument, KVStoreError, NotFound,
                                   PermissionDenied, Reason, ResourceExhausted, StaleRead,
                                   Unauthenticated, Unavailable)
from kvstore.client.aio import AsyncKVClient, AsyncNamespace
from kvstore.client.namespace import (BlockLease, LookupResult, Namespace, PrefetchTicket,
                                      RemotePlacement)
from kvstore.client.sdk import KVClient
from kvstore.core.layout import KVLayout

__all__ = ["KVClient", "AsyncKVClient", "AsyncNamespace", "KVLayout", "Namespace", "BlockLease",
           "LookupResult", "PrefetchTicket", "RemotePlacement", "KVStoreError",
           "InvalidArgument", "NotFound",
           "FailedPrecondition", "ResourceExhausted", "Unavailable", "StaleRead",
           "PermissionDenied", "Unauthenticated", "Reason"]
