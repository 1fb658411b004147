from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_HBM: _ClassVar[Tier]
    TIER_DRAM: _ClassVar[Tier]
    TIER_SSD: _ClassVar[Tier]
    TIER_REMOTE: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_HBM: Tier
TIER_DRAM: Tier
TIER_SSD: Tier
TIER_REMOTE: Tier

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "block_tokens", "dtype", "tp_rank", "tp_size", "quant")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str
    tp_rank: int
    tp_size: int
    quant: str
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., quant: _Optional[str] = ...) -> None: ...

class ArenaInfo(_message.Message):
    __slots__ = ("path", "size_bytes", "uuid", "generations_path", "index_path")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_PATH_FIELD_NUMBER: _ClassVar[int]
    INDEX_PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    uuid: bytes
    generations_path: str
    index_path: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., uuid: _Optional[bytes] = ..., generations_path: _Optional[str] = ..., index_path: _Optional[str] = ...) -> None: ...

class HBMPoolInfo(_message.Message):
    __slots__ = ("backend", "size_bytes", "device_uuid", "ipc_device", "ipc_handle", "ipc_storage_bytes", "ipc_storage_offset", "ipc_ref_counter_handle", "ipc_ref_counter_offset", "ipc_event_handle", "ipc_event_sync_required", "path", "uuid")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    IPC_DEVICE_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPC_STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IPC_STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IPC_REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPC_REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IPC_EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPC_EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    backend: str
    size_bytes: int
    device_uuid: str
    ipc_device: int
    ipc_handle: bytes
    ipc_storage_bytes: int
    ipc_storage_offset: int
    ipc_ref_counter_handle: bytes
    ipc_ref_counter_offset: int
    ipc_event_handle: bytes
    ipc_event_sync_required: bool
    path: str
    uuid: bytes
    def __init__(self, backend: _Optional[str] = ..., size_bytes: _Optional[int] = ..., device_uuid: _Optional[str] = ..., ipc_device: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., ipc_storage_bytes: _Optional[int] = ..., ipc_storage_offset: _Optional[int] = ..., ipc_ref_counter_handle: _Optional[bytes] = ..., ipc_ref_counter_offset: _Optional[int] = ..., ipc_event_handle: _Optional[bytes] = ..., ipc_event_sync_required: _Optional[bool] = ..., path: _Optional[str] = ..., uuid: _Optional[bytes] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("client_name", "pid")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    pid: int
    def __init__(self, client_name: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id", "arena", "daemon_version", "max_batch_blocks", "max_message_bytes", "hbm")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_FIELD_NUMBER: _ClassVar[int]
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HBM_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    arena: ArenaInfo
    daemon_version: str
    max_batch_blocks: int
    max_message_bytes: int
    hbm: HBMPoolInfo
    def __init__(self, session_id: _Optional[int] = ..., arena: _Optional[_Union[ArenaInfo, _Mapping]] = ..., daemon_version: _Optional[str] = ..., max_batch_blocks: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., hbm: _Optional[_Union[HBMPoolInfo, _Mapping]] = ...) -> None: ...

class RegisterNamespaceRequest(_message.Message):
    __slots__ = ("model_id", "layout", "tenant")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    layout: KVLayout
    tenant: str
    def __init__(self, model_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class RegisterNamespaceResponse(_message.Message):
    __slots__ = ("namespace_id", "block_bytes", "slot_bytes")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    block_bytes: int
    slot_bytes: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., block_bytes: _Optional[int] = ..., slot_bytes: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_cached", "tiers")
    NUM_CACHED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    num_cached: int
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    def __init__(self, num_cached: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("session_id", "namespace_id", "keys", "parent_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PARENT_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace_id: bytes
    keys: bytes
    parent_key: bytes
    def __init__(self, session_id: _Optional[int] = ..., namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., parent_key: _Optional[bytes] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("allocation_id", "offsets")
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    allocation_id: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, allocation_id: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class WriteBlocksRequest(_message.Message):
    __slots__ = ("session_id", "allocation_id", "first_index", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    allocation_id: int
    first_index: int
    data: bytes
    def __init__(self, session_id: _Optional[int] = ..., allocation_id: _Optional[int] = ..., first_index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteBlocksResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("session_id", "allocation_id", "abort")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    allocation_id: int
    abort: bool
    def __init__(self, session_id: _Optional[int] = ..., allocation_id: _Optional[int] = ..., abort: _Optional[bool] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: int
    def __init__(self, committed: _Optional[int] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("session_id", "namespace_id", "keys", "want_hbm", "release_lease_ids", "release_waited_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    WANT_HBM_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_WAITED_S_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace_id: bytes
    keys: bytes
    want_hbm: bool
    release_lease_ids: _containers.RepeatedScalarFieldContainer[int]
    release_waited_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[int] = ..., namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., want_hbm: _Optional[bool] = ..., release_lease_ids: _Optional[_Iterable[int]] = ..., release_waited_s: _Optional[_Iterable[float]] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease_id", "offsets", "tiers", "lease_timeout_s", "hbm_offsets", "hbm_fill", "generations")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    HBM_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    HBM_FILL_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    lease_timeout_s: float
    hbm_offsets: _containers.RepeatedScalarFieldContainer[int]
    hbm_fill: _containers.RepeatedScalarFieldContainer[int]
    generations: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., lease_timeout_s: _Optional[float] = ..., hbm_offsets: _Optional[_Iterable[int]] = ..., hbm_fill: _Optional[_Iterable[int]] = ..., generations: _Optional[_Iterable[int]] = ...) -> None: ...

class AcquireLayersResponse(_message.Message):
    __slots__ = ("lease", "num_layers", "layers_ready", "done", "verified")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_READY_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    lease: AcquireResponse
    num_layers: int
    layers_ready: int
    done: bool
    verified: int
    def __init__(self, lease: _Optional[_Union[AcquireResponse, _Mapping]] = ..., num_layers: _Optional[int] = ..., layers_ready: _Optional[int] = ..., done: _Optional[bool] = ..., verified: _Optional[int] = ...) -> None: ...

class ReadBlocksRequest(_message.Message):
    __slots__ = ("session_id", "lease_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    lease_id: int
    def __init__(self, session_id: _Optional[int] = ..., lease_id: _Optional[int] = ...) -> None: ...

class BlockData(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "lease_id", "hbm_filled", "release_lease_ids", "release_waited_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HBM_FILLED_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_WAITED_S_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    lease_id: int
    hbm_filled: bool
    release_lease_ids: _containers.RepeatedScalarFieldContainer[int]
    release_waited_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[int] = ..., lease_id: _Optional[int] = ..., hbm_filled: _Optional[bool] = ..., release_lease_ids: _Optional[_Iterable[int]] = ..., release_waited_s: _Optional[_Iterable[float]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "blocks", "hits", "misses", "evictions", "bytes_in", "bytes_out", "promotions", "demotions", "ready_bytes", "checksum_failures", "recovered_blocks", "read_bps", "write_bps", "io_errors", "hit_rate", "get_latency", "put_latency", "queue_depth", "circuit_state", "writes_skipped", "writes_deduplicated", "timeouts", "backend", "remote_nodes")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    READY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    READ_BPS_FIELD_NUMBER: _ClassVar[int]
    WRITE_BPS_FIELD_NUMBER: _ClassVar[int]
    IO_ERRORS_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    GET_LATENCY_FIELD_NUMBER: _ClassVar[int]
    PUT_LATENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_STATE_FIELD_NUMBER: _ClassVar[int]
    WRITES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    WRITES_DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REMOTE_NODES_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    evictions: int
    bytes_in: int
    bytes_out: int
    promotions: int
    demotions: int
    ready_bytes: int
    checksum_failures: int
    recovered_blocks: int
    read_bps: float
    write_bps: float
    io_errors: int
    hit_rate: float
    get_latency: LatencySummary
    put_latency: LatencySummary
    queue_depth: int
    circuit_state: str
    writes_skipped: int
    writes_deduplicated: int
    timeouts: int
    backend: str
    remote_nodes: _containers.RepeatedCompositeFieldContainer[RemoteNode]
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., ready_bytes: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., recovered_blocks: _Optional[int] = ..., read_bps: _Optional[float] = ..., write_bps: _Optional[float] = ..., io_errors: _Optional[int] = ..., hit_rate: _Optional[float] = ..., get_latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., put_latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., queue_depth: _Optional[int] = ..., circuit_state: _Optional[str] = ..., writes_skipped: _Optional[int] = ..., writes_deduplicated: _Optional[int] = ..., timeouts: _Optional[int] = ..., backend: _Optional[str] = ..., remote_nodes: _Optional[_Iterable[_Union[RemoteNode, _Mapping]]] = ...) -> None: ...

class RemoteNode(_message.Message):
    __slots__ = ("node", "circuit_state", "errors", "keys_unavailable")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_STATE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    KEYS_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    node: str
    circuit_state: str
    errors: int
    keys_unavailable: int
    def __init__(self, node: _Optional[str] = ..., circuit_state: _Optional[str] = ..., errors: _Optional[int] = ..., keys_unavailable: _Optional[int] = ...) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("count", "sum_s", "p50_s", "p99_s", "bucket_upper_s", "bucket_counts")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_S_FIELD_NUMBER: _ClassVar[int]
    P50_S_FIELD_NUMBER: _ClassVar[int]
    P99_S_FIELD_NUMBER: _ClassVar[int]
    BUCKET_UPPER_S_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    count: int
    sum_s: float
    p50_s: float
    p99_s: float
    bucket_upper_s: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, count: _Optional[int] = ..., sum_s: _Optional[float] = ..., p50_s: _Optional[float] = ..., p99_s: _Optional[float] = ..., bucket_upper_s: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class NamespaceStats(_message.Message):
    __slots__ = ("namespace_id", "model_id", "tenant", "blocks", "bytes")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    model_id: str
    tenant: str
    blocks: int
    bytes: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., model_id: _Optional[str] = ..., tenant: _Optional[str] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("tiers", "namespaces", "sessions", "active_leases", "uptime_s", "daemon_version", "lookups", "puts_rejected", "leases_expired", "sessions_reclaimed", "reads_reported", "prefetch_on_time", "prefetch_late", "prefetch_wasted", "checksum_failures", "recompute_fallbacks", "recompute_fallback_blocks", "requests_throttled", "auth_failures", "lookup_latency", "prefetch_issued", "prefetch_cancelled", "prefetch_bytes_promoted", "prefetch_pending", "quarantined_bytes", "kv_events_published", "kv_events_dropped")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    PUTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    READS_REPORTED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_ON_TIME_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_LATE_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_WASTED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FALLBACK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_THROTTLED_FIELD_NUMBER: _ClassVar[int]
    AUTH_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_LATENCY_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_ISSUED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_BYTES_PROMOTED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_PENDING_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceStats]
    sessions: int
    active_leases: int
    uptime_s: float
    daemon_version: str
    lookups: int
    puts_rejected: int
    leases_expired: int
    sessions_reclaimed: int
    reads_reported: int
    prefetch_on_time: int
    prefetch_late: int
    prefetch_wasted: int
    checksum_failures: int
    recompute_fallbacks: int
    recompute_fallback_blocks: int
    requests_throttled: int
    auth_failures: int
    lookup_latency: LatencySummary
    prefetch_issued: int
    prefetch_cancelled: int
    prefetch_bytes_promoted: int
    prefetch_pending: int
    quarantined_bytes: int
    kv_events_published: int
    kv_events_dropped: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., namespaces: _Optional[_Iterable[_Union[NamespaceStats, _Mapping]]] = ..., sessions: _Optional[int] = ..., active_leases: _Optional[int] = ..., uptime_s: _Optional[float] = ..., daemon_version: _Optional[str] = ..., lookups: _Optional[int] = ..., puts_rejected: _Optional[int] = ..., leases_expired: _Optional[int] = ..., sessions_reclaimed: _Optional[int] = ..., reads_reported: _Optional[int] = ..., prefetch_on_time: _Optional[int] = ..., prefetch_late: _Optional[int] = ..., prefetch_wasted: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., recompute_fallbacks: _Optional[int] = ..., recompute_fallback_blocks: _Optional[int] = ..., requests_throttled: _Optional[int] = ..., auth_failures: _Optional[int] = ..., lookup_latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., prefetch_issued: _Optional[int] = ..., prefetch_cancelled: _Optional[int] = ..., prefetch_bytes_promoted: _Optional[int] = ..., prefetch_pending: _Optional[int] = ..., quarantined_bytes: _Optional[int] = ..., kv_events_published: _Optional[int] = ..., kv_events_dropped: _Optional[int] = ...) -> None: ...

class WatchStatsRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class ReportFallbacksRequest(_message.Message):
    __slots__ = ("namespace_id", "count", "blocks", "reason")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    count: int
    blocks: int
    reason: str
    def __init__(self, namespace_id: _Optional[bytes] = ..., count: _Optional[int] = ..., blocks: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportFallbacksResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportReadsRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "misses", "get_s", "lookups")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    GET_S_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    misses: int
    get_s: _containers.RepeatedScalarFieldContainer[float]
    lookups: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., misses: _Optional[int] = ..., get_s: _Optional[_Iterable[float]] = ..., lookups: _Optional[int] = ...) -> None: ...

class ReportReadsResponse(_message.Message):
    __slots__ = ("counted",)
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    counted: int
    def __init__(self, counted: _Optional[int] = ...) -> None: ...

class PrefetchItem(_message.Message):
    __slots__ = ("keys", "deadline_s")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    keys: bytes
    deadline_s: float
    def __init__(self, keys: _Optional[bytes] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class FlushRemoteRequest(_message.Message):
    __slots__ = ("session_id", "namespace_id", "keys", "deadline_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace_id: bytes
    keys: bytes
    deadline_s: float
    def __init__(self, session_id: _Optional[int] = ..., namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class FlushRemoteResponse(_message.Message):
    __slots__ = ("placed", "num_placed", "timed_out")
    PLACED_FIELD_NUMBER: _ClassVar[int]
    NUM_PLACED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    placed: _containers.RepeatedScalarFieldContainer[bool]
    num_placed: int
    timed_out: bool
    def __init__(self, placed: _Optional[_Iterable[bool]] = ..., num_placed: _Optional[int] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("session_id", "namespace_id", "items", "grace_s", "to_hbm")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    TO_HBM_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace_id: bytes
    items: _containers.RepeatedCompositeFieldContainer[PrefetchItem]
    grace_s: float
    to_hbm: bool
    def __init__(self, session_id: _Optional[int] = ..., namespace_id: _Optional[bytes] = ..., items: _Optional[_Iterable[_Union[PrefetchItem, _Mapping]]] = ..., grace_s: _Optional[float] = ..., to_hbm: _Optional[bool] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("prefetch_ids", "blocks", "to_promote")
    PREFETCH_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TO_PROMOTE_FIELD_NUMBER: _ClassVar[int]
    prefetch_ids: _containers.RepeatedScalarFieldContainer[int]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    to_promote: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prefetch_ids: _Optional[_Iterable[int]] = ..., blocks: _Optional[_Iterable[int]] = ..., to_promote: _Optional[_Iterable[int]] = ...) -> None: ...

class CancelPrefetchRequest(_message.Message):
    __slots__ = ("session_id", "prefetch_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    prefetch_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[int] = ..., prefetch_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CancelPrefetchResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: int
    def __init__(self, cancelled: _Optional[int] = ...) -> None: ...

class PrefillProfile(_message.Message):
    __slots__ = ("c0", "c1", "c2")
    C0_FIELD_NUMBER: _ClassVar[int]
    C1_FIELD_NUMBER: _ClassVar[int]
    C2_FIELD_NUMBER: _ClassVar[int]
    c0: float
    c1: float
    c2: float
    def __init__(self, c0: _Optional[float] = ..., c1: _Optional[float] = ..., c2: _Optional[float] = ...) -> None: ...

class PlanRecomputeRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "profile", "latency_s")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    profile: PrefillProfile
    latency_s: float
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., profile: _Optional[_Union[PrefillProfile, _Mapping]] = ..., latency_s: _Optional[float] = ...) -> None: ...

class PlanRecomputeResponse(_message.Message):
    __slots__ = ("num_cached", "tiers", "recompute_tokens", "load_blocks_from", "predicted_s", "load_all_s", "recompute_all_s", "dram_read_bps", "ssd_read_bps", "remote_read_bps")
    NUM_CACHED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOAD_BLOCKS_FROM_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_ALL_S_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_ALL_S_FIELD_NUMBER: _ClassVar[int]
    DRAM_READ_BPS_FIELD_NUMBER: _ClassVar[int]
    SSD_READ_BPS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_READ_BPS_FIELD_NUMBER: _ClassVar[int]
    num_cached: int
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    recompute_tokens: int
    load_blocks_from: int
    predicted_s: float
    load_all_s: float
    recompute_all_s: float
    dram_read_bps: float
    ssd_read_bps: float
    remote_read_bps: float
    def __init__(self, num_cached: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., recompute_tokens: _Optional[int] = ..., load_blocks_from: _Optional[int] = ..., predicted_s: _Optional[float] = ..., load_all_s: _Optional[float] = ..., recompute_all_s: _Optional[float] = ..., dram_read_bps: _Optional[float] = ..., ssd_read_bps: _Optional[float] = ..., remote_read_bps: _Optional[float] = ...) -> None: ...
