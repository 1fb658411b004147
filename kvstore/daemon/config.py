"""The daemon's configuration: one typed object, built once from

    defaults  ←  TOML file (--config)  ←  KVSTORE_* environment  ←  command-line flags

and validated once. Every key is declared once, in ``FIELDS``, with its parser, default and help
(its type and unit derive from the parser: kvstore.core.settings); the TOML key, the environment
variable (KVSTORE_<KEY>) and the flag (--<key-with-dashes>) all derive from its name, and the
reference (docs/configuration.md, ``kvstore config --reference``) and the typed ``Config`` class
below are generated from the table. Errors name the key and where the bad value came from; an
unknown key in the TOML file, or a KVSTORE_* variable that is a near miss of a key, is an error
that suggests the nearest known key (other KVSTORE_* variables belong to other tools and are left
alone).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.core.errors import ConfigError
from kvstore.core.paths import default_socket
from kvstore.core.settings import (Field, _bool, _int0, _names, _port, _pos_float, _pos_int,
                                   _rate0, _size, _size0, _str, nearest, parse_value,
                                   unknown_key_error)
from kvstore.core.units import format_bytes

__all__ = ["FIELDS", "Config", "ConfigError", "Field", "load_config", "nearest_key", "group_of"]


def _default_dram_bytes() -> int:
    """A quarter of the memory available when the daemon starts (at most 64 GiB, at least
    64 MiB)."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not avail:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(64 << 20, min(avail // 4, 64 << 30)) // (1 << 20) * (1 << 20)


def _default_socket() -> str:
    """Per user: $XDG_RUNTIME_DIR/kvstore/kvstore.sock, else /tmp/kvstore-<uid>/kvstore.sock."""
    return default_socket()


def _default_ssd_dir() -> str:
    """kvstore/ssd under the user's cache directory ($XDG_CACHE_HOME, else ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "kvstore" / "ssd")


def _hbm_device(v: Any) -> str:
    s = str(v).strip().lower()
    if s == "host" or s == "cuda" or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise ValueError(f"must be cuda, cuda:N or host, got {v!r}")


def _write_policy(v: Any) -> str:
    from kvstore.policies.write import SSD_WRITE_POLICIES, normalize
    return normalize(v, SSD_WRITE_POLICIES)


def _remote_url(v: Any) -> str:
    s = str(v).strip()
    if s:
        from kvstore.tiers.remote.base import parse_remote_url
        parse_remote_url(s)
    return s


def _remote_policy(v: Any) -> str:
    from kvstore.policies.write import REMOTE_WRITE_POLICIES, normalize
    return normalize(v, REMOTE_WRITE_POLICIES)


def _log_level(v: Any) -> str:
    s = str(v).upper()
    if s not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be one of debug, info, warning, error; got {v!r}")
    return s.lower()


def _event_loop(v: Any) -> str:
    s = str(v).strip().lower()
    if s not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"must be one of auto, uvloop, asyncio; got {v!r}")
    return s


def _redacted(v: Any) -> str:
    return "(set)" if v else ""


FIELDS: list[Field] = [
    Field("socket", _str, _default_socket, "Unix socket the daemon listens on (mode 0600)"),
    Field("listen", _str, "", "also listen on TCP host:port (off when empty)"),
    Field("dram_bytes", _size, _default_dram_bytes, "DRAM tier size (shared-memory arena)",
          format_bytes),
    Field("chunk_bytes", _size, 64 << 20, "arena chunk size; one block size per chunk",
          format_bytes),
    Field("shm_dir", _str, "/dev/shm", "directory of the shared-memory arena file"),
    Field("dram_prepare_limit", _rate0, 0, "cap on how fast the arena is prepared in the "
          "background after start-up, e.g. 1GB/s (0: none): a daemon restarted beside a running "
          "engine then leaves it memory bandwidth while it prefaults a large arena",
          lambda v: f"{format_bytes(v)}/s" if v else "none"),
    Field("max_batch_blocks", _pos_int, 4096, "most blocks one request may name"),
    Field("max_message_bytes", _size, 64 << 20, "largest gRPC message accepted", format_bytes),
    Field("lease_timeout_s", _pos_float, 30.0, "a get's lease expires after this long"),
    Field("allocation_timeout_s", _pos_float, 30.0, "an uncommitted put expires after this long"),
    Field("quarantine_timeout_s", _pos_float, 300.0, "slots an aborted put's writer may still "
          "copy into are reused once its process exits or unmaps the arena; for a writer the "
          "daemon cannot watch (another pid namespace), this long after its session ended"),
    Field("log_level", _log_level, "info", "debug, info, warning or error"),
    Field("event_loop", _event_loop, "auto", "the daemon's event loop: uvloop (its calls cost "
          "the loop about a sixth less CPU than asyncio's), asyncio, or auto (uvloop where it is "
          "installed)"),
    Field("ssd_dir", _str, _default_ssd_dir, "directory of the SSD tier's slab files and journal"),
    Field("ssd_bytes", _size0, 0, "SSD tier capacity (0: no SSD tier)", format_bytes),
    Field("ssd_segment_bytes", _size0, 0, "size of one preallocated slab file (0: the "
          "directory's own, or capacity/64 within 64 MiB..16 GiB for a new one)", format_bytes),
    Field("ssd_io_threads", _pos_int, 16, "SSD I/O threads (requests in flight)"),
    Field("ssd_io_uring", _bool, True, "read and write SSD slots through an io_uring driven "
          "by the event loop (no thread hand-offs per request) where the kernel allows it "
          "(x86-64; not with ssd_read_limit); off, or where io_uring is refused, the I/O "
          "threads do"),
    Field("ssd_write_policy", _write_policy, "write_through",
          "write_through (commit waits for SSD), write_back (written when evicted) or "
          "write_through_selective (written once read ssd_write_hits times; others never)"),
    Field("ssd_write_hits", _pos_int, 1, "write_through_selective: gets of a block before it "
          "is written to SSD"),
    Field("ssd_read_limit", _rate0, 0, "cap on SSD read bandwidth, e.g. 200MB/s (0: none): "
          "leaves the rest of a disk shared with model loading, logs or other tenants to them; "
          "also how benchmarks emulate a slower disk",
          lambda v: f"{format_bytes(v)}/s" if v else "none"),
    Field("ssd_recovery_batch", _pos_int, 4096, "SSD index entries restored per event-loop "
          "turn while the index loads in the background (requests are answered in between)"),
    Field("ssd_recovery_limit", _int0, 0, "cap on how fast the SSD index loads, in blocks/s "
          "(0: none); slows recovery down so tests can watch the daemon serve while it loads",
          lambda v: f"{v} blocks/s" if v else "none", unit="blocks/s", internal=True),
    Field("hbm_bytes", _size0, 0, "HBM tier size: a GPU memory pool shared with clients by "
          "CUDA IPC (0: no HBM tier)", format_bytes),
    Field("hbm_device", _hbm_device, "cuda", "GPU of the HBM pool (cuda, cuda:N), or host: "
          "the tier's protocol on shared memory, for CPU hosts and tests (no speed-up)"),
    Field("prefetch_concurrency", _pos_int, 4, "prefetches whose SSD reads run at once"),
    Field("prefetch_grace_s", _pos_float, 5.0, "a prefetched block stays leased this long past "
          "its deadline"),
    Field("max_pending_prefetches", _pos_int, 65536, "prefetches queued or leased at once"),
    Field("max_prefetch_bytes_per_client", _size, 0, "bytes of blocks one client's pending "
          "prefetches may pin (0: half the DRAM tier)",
          lambda v: format_bytes(v) if v else "auto"),
    # -- the remote (cluster) tier: kvstore/tiers/remote/ -------------------------------------
    Field("remote", _remote_url, "", "cluster tier below SSD: mooncake://MASTER:PORT or "
          "redis://HOST:PORT[,HOST:PORT...] (off when empty)"),
    Field("remote_write_policy", _remote_policy, "write_through", "write_through (every "
          "committed block, in the background) or write_through_selective (once read "
          "remote_write_hits times)"),
    Field("remote_write_hits", _pos_int, 1, "write_through_selective: gets before the remote "
          "write"),
    Field("remote_deadline_s", _pos_float, 0.2, "longest a lookup waits for the remote's "
          "existence check (then: a miss)"),
    Field("remote_read_deadline_s", _pos_float, 2.0, "longest a get waits for remote reads "
          "(then: the local prefix)"),
    Field("remote_read_chunk_bytes", _size, 256 << 20, "bytes per remote read call within one "
          "fill: each chunk is verified while the next transfers", format_bytes),
    Field("remote_fill_on_lookup", _bool, True, "a lookup that finds blocks in the remote "
          "starts reading them into DRAM (in the background: it answers without waiting)"),
    Field("remote_threads", _pos_int, 4, "threads making remote calls (2x that in flight)"),
    Field("remote_queue_blocks", _pos_int, 256, "blocks waiting for the background writer; "
          "more are skipped and counted"),
    Field("remote_flush_deadline_s", _pos_float, 10.0, "longest a FlushRemote (a producer "
          "waiting for its blocks to reach the cluster tier) waits when it names no deadline"),
    Field("remote_retry_s", _pos_float, 1.0, "circuit breaker: first wait before probing a "
          "failed remote again (doubles, up to 10 s)"),
    Field("remote_segment_bytes", _size0, 256 << 20, "Mooncake: memory this daemon lends the "
          "cluster's pool (0: none, a client only)", format_bytes),
    Field("remote_buffer_bytes", _size, 64 << 20, "Mooncake: the client's local transfer "
          "buffer", format_bytes),
    Field("remote_replicas", _pos_int, 1, "Mooncake: replicas per block (2 keeps blocks when "
          "one host leaves)"),
    Field("remote_local_host", _str, "", "Mooncake: address this host advertises to peers "
          "(default: the one that reaches the master)"),
    # -- operations: statistics, lifecycle, access control, limits ---------------------------
    Field("kv_events_endpoint", _str, "", "publish every tier change as vLLM KV events on a "
          "ZMQ PUB socket bound here, e.g. tcp://127.0.0.1:5557 (off when empty)"),
    Field("kv_events_replay_endpoint", _str, "", "ZMQ ROUTER bound here answers replay (from a "
          "sequence number) and snapshot requests (off when empty)"),
    Field("kv_events_topic", _str, "", "topic frame of every published batch"),
    Field("kv_events_tenants", _names, (), "publish only blocks of these tenants' namespaces "
          "(empty: every tenant)", lambda v: ",".join(v) or "all"),
    Field("kv_events_buffer_batches", _pos_int, 10_000, "batches kept for replay"),
    Field("kv_events_queue", _pos_int, 65_536, "tier changes waiting for the publisher thread; "
          "past that they are dropped, counted (kv_events_dropped) and seen as a sequence gap"),
    Field("metrics_port", _port, 0, "serve /metrics (Prometheus) and the dashboard on this "
          "port (0: off)"),
    Field("metrics_host", _str, "127.0.0.1", "address the metrics port binds"),
    Field("metrics_history_s", _pos_int, 600, "seconds of once-a-second samples the daemon "
          "keeps for the dashboard (/api/history)"),
    Field("shutdown_grace_s", _pos_float, 5.0, "SIGTERM: in-flight calls get this long to finish"),
    Field("socket_group", _str, "", "make the Unix socket 0660 owned by this group (else 0600)"),
    Field("socket_requires_token", _bool, False, "require a bearer token on the Unix socket too"),
    Field("tokens_file", _str, "", "bearer tokens: lines 'TOKEN TENANT [SHARED_SALT ...]'"),
    Field("arena_tenants", _names, (), "tenants whose tokens may map the shared arena and "
          "the HBM pool (a process that maps them can read every tenant's blocks); other "
          "tokens move bytes over gRPC", lambda v: ",".join(v) or "none"),
    Field("auth_token", _str, "", "a single bearer token for tenant '' (prefer "
          "$KVSTORE_AUTH_TOKEN)", _redacted),
    Field("tls_cert_file", _str, "", "TLS certificate (PEM) for the TCP listener"),
    Field("tls_key_file", _str, "", "TLS private key (PEM) for the TCP listener"),
    Field("max_inflight_requests_per_client", _pos_int, 256,
          "outstanding puts + gets + streams one client may have"),
    Field("max_inflight_bytes_per_client", _size, 0, "bytes of outstanding puts + gets one "
          "client may have (0: half the DRAM tier)", lambda v: format_bytes(v) if v else "auto"),
]
_BY_NAME = {f.name: f for f in FIELDS}

# The reference's sections: a key belongs to the first group with a prefix it starts with
# (prefixes rather than a column in FIELDS, so a new row needs no group to be placed).
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("Socket, TCP and access control", ("socket", "listen", "tokens_file", "arena_tenants",
                                        "auth_token", "tls_")),
    ("DRAM tier", ("dram_", "chunk_bytes", "shm_dir")),
    ("SSD tier", ("ssd_",)),
    ("HBM tier", ("hbm_",)),
    ("Prefetch", ("prefetch_", "max_pending_prefetches", "max_prefetch_")),
    ("Cluster tier", ("remote",)),
    ("KV events", ("kv_events",)),
    ("Requests and per-client limits", ("max_", "lease_timeout_s", "allocation_timeout_s")),
    ("Operations", ("log_level", "event_loop", "metrics_", "shutdown_")),
]


def group_of(name: str) -> str:
    """The reference section a key is listed in ("Other" when no prefix matches)."""
    for title, prefixes in GROUPS:
        if any(name == p or name.startswith(p) for p in prefixes):
            return title
    return "Other"


def user_fields() -> list[Field]:
    """The keys an operator sets (flags, TOML, $KVSTORE_*): FIELDS less the internal ones."""
    return [f for f in FIELDS if not f.internal]


def env_name(f: Field) -> str:
    """The environment variable of a key: KVSTORE_<KEY>, KVSTORE_INTERNAL_<KEY> if internal."""
    return f"KVSTORE_{'INTERNAL_' if f.internal else ''}{f.name.upper()}"


def flag_name(f: Field) -> str | None:
    """The command-line flag of a key (None for an internal key: it has none)."""
    return None if f.internal else "--" + f.name.replace("_", "-")


def _from_fields(cls):
    """Give ``cls`` an annotation for every FIELDS key its generated block does not list yet (a
    row merged without regenerating), typed from the table, so Config never lacks a key at run
    time; tests/daemon/test_config_reference.py fails until the block is regenerated."""
    ann = cls.__dict__["__annotations__"]
    for f in FIELDS:
        ann.setdefault(f.name, f.type_name)
    return cls


@dataclass(kw_only=True)
@_from_fields
class Config:
    """The effective configuration: one typed attribute per FIELDS key, plus ``sources`` (key ->
    where its value came from: a file, $VARIABLE or --flag; absent: the default). Built only by
    :func:`load_config`, which validates it."""

    # BEGIN generated from FIELDS (`kvstore config --reference --write`); do not edit by hand
    socket: str
    listen: str
    dram_bytes: int
    chunk_bytes: int
    shm_dir: str
    dram_prepare_limit: int
    max_batch_blocks: int
    max_message_bytes: int
    lease_timeout_s: float
    allocation_timeout_s: float
    quarantine_timeout_s: float
    log_level: str
    event_loop: str
    ssd_dir: str
    ssd_bytes: int
    ssd_segment_bytes: int
    ssd_io_threads: int
    ssd_io_uring: bool
    ssd_write_policy: str
    ssd_write_hits: int
    ssd_read_limit: int
    ssd_recovery_batch: int
    ssd_recovery_limit: int
    hbm_bytes: int
    hbm_device: str
    prefetch_concurrency: int
    prefetch_grace_s: float
    max_pending_prefetches: int
    max_prefetch_bytes_per_client: int
    remote: str
    remote_write_policy: str
    remote_write_hits: int
    remote_deadline_s: float
    remote_read_deadline_s: float
    remote_read_chunk_bytes: int
    remote_fill_on_lookup: bool
    remote_threads: int
    remote_queue_blocks: int
    remote_flush_deadline_s: float
    remote_retry_s: float
    remote_segment_bytes: int
    remote_buffer_bytes: int
    remote_replicas: int
    remote_local_host: str
    kv_events_endpoint: str
    kv_events_replay_endpoint: str
    kv_events_topic: str
    kv_events_tenants: tuple[str, ...]
    kv_events_buffer_batches: int
    kv_events_queue: int
    metrics_port: int
    metrics_host: str
    metrics_history_s: int
    shutdown_grace_s: float
    socket_group: str
    socket_requires_token: bool
    tokens_file: str
    arena_tenants: tuple[str, ...]
    auth_token: str
    tls_cert_file: str
    tls_key_file: str
    max_inflight_requests_per_client: int
    max_inflight_bytes_per_client: int
    # END generated
    sources: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """Every user key's typed value (numbers as numbers), secrets redacted: `config --json`."""
        return {f.name: f.show(getattr(self, f.name)) if f.show is _redacted
                else getattr(self, f.name) for f in user_fields()}

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, value, source) rows for `kvstore config --print`; source is a file, $VARIABLE,
        --flag or "default". An auto default's value says what it is and what it comes to here
        and now ("auto: a quarter of ..., now 5.6 GiB"): a daemon computes its own when it
        starts, so the number alone would claim what no daemon may have."""
        rows = []
        for f in user_fields():
            shown = f.show(getattr(self, f.name))
            if f.name not in self.sources and f.is_auto:
                shown = f"auto: {f.auto_text()}, now {shown}"
            rows.append((f.name, shown, self.sources.get(f.name, "default")))
        return rows

    def validate(self) -> None:
        """Raise ConfigError naming the key(s) when values are inconsistent together."""
        if self.dram_bytes < 2 * self.chunk_bytes and self.dram_bytes < (64 << 20):
            raise ConfigError(f"dram_bytes: {format_bytes(self.dram_bytes)} is too small "
                              f"(at least 64 MiB)")
        if self.chunk_bytes % 4096:
            raise ConfigError("chunk_bytes: must be a multiple of 4 KiB")
        if self.ssd_bytes and self.ssd_segment_bytes and self.ssd_bytes < self.ssd_segment_bytes:
            raise ConfigError(f"ssd_bytes: {format_bytes(self.ssd_bytes)} is smaller than one "
                              f"segment (ssd_segment_bytes={format_bytes(self.ssd_segment_bytes)})")
        if self.ssd_segment_bytes % 4096:
            raise ConfigError("ssd_segment_bytes: must be a multiple of 4 KiB")
        # An SSD directory given without a size was meant to be used: refusing it beats both a
        # silent "off" and a size picked for the operator's disk without asking.
        if "ssd_dir" in self.sources and not self.ssd_bytes:
            raise ConfigError(f"ssd_dir is set (from {self.sources['ssd_dir']}) but ssd_bytes is "
                              "0, so there would be no SSD tier: set ssd_bytes too (e.g. "
                              "--ssd-bytes 10GiB), or leave ssd_dir unset")
        if self.hbm_bytes and self.hbm_bytes < (1 << 20):
            raise ConfigError(f"hbm_bytes: {format_bytes(self.hbm_bytes)} is too small "
                              "(at least 1 MiB, or 0 for no HBM tier)")
        if self.listen and ":" not in self.listen:
            raise ConfigError(f"listen: expected host:port, got {self.listen!r}")
        if self.listen and not (self.tokens_file or self.auth_token):
            raise ConfigError("listen: TCP requires bearer-token authentication: set tokens_file "
                              "or auth_token ($KVSTORE_AUTH_TOKEN)")
        if self.socket_requires_token and not (self.tokens_file or self.auth_token):
            raise ConfigError("socket_requires_token: no tokens configured (tokens_file or "
                              "auth_token)")
        for key in ("kv_events_endpoint", "kv_events_replay_endpoint"):
            value = getattr(self, key)
            if value and not value.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"{key}: expected tcp://HOST:PORT or ipc://PATH, got {value!r}")
        if self.kv_events_replay_endpoint and not self.kv_events_endpoint:
            raise ConfigError("kv_events_replay_endpoint: needs kv_events_endpoint (the replay "
                              "socket serves the stream published there)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file/tls_key_file: set both or neither")
        if self.tls_cert_file and not self.listen:
            raise ConfigError("tls_cert_file: TLS applies to the TCP listener; set listen too")

    @property
    def prefetch_bytes_per_client(self) -> int:
        return self.max_prefetch_bytes_per_client or self.dram_bytes // 2

    @property
    def inflight_bytes_per_client(self) -> int:
        return self.max_inflight_bytes_per_client or self.dram_bytes // 2


_LISTING = "`kvstore config --print` lists the keys"


def load_config(config_file: str | Path | None = None, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Build and validate the effective configuration. Raises ConfigError naming the key.

    ``overrides`` are the flags (key -> raw value; None: not given); in-process callers may
    also set internal keys there."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    user_keys = [f.name for f in user_fields()]

    def apply(key: str, raw: Any, source: str, internal_ok: bool = False) -> None:
        f = _BY_NAME.get(key)
        if f is None:
            raise unknown_key_error(source, key, user_keys, _LISTING)
        if f.internal and not internal_ok:
            raise ConfigError(f"{source}: {key!r} is an internal setting for tests, not a "
                              f"configuration key (${env_name(f)} sets it)")
        values[key] = parse_value(f, raw, source)
        sources[key] = source

    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, raw in _flatten(data).items():
            apply(key, raw, str(path))
    for f in FIELDS:
        if env_name(f) in env:
            apply(f.name, env[env_name(f)], f"${env_name(f)}", internal_ok=True)
    internal_keys = [f.name for f in FIELDS if f.internal]
    for name in sorted(env):
        if not name.startswith("KVSTORE_"):
            continue
        if name.startswith("KVSTORE_INTERNAL_"):
            key = name.removeprefix("KVSTORE_INTERNAL_").lower()
            if key not in internal_keys:
                near = nearest(key, internal_keys)
                raise ConfigError(f"${name}: unknown internal key {key!r}"
                                  + (f" (did you mean $KVSTORE_INTERNAL_{near.upper()}?)"
                                     if near else ""))
            continue
        key = name.removeprefix("KVSTORE_").lower()
        if key in internal_keys:
            apply(key, env[name], f"${name}")      # raises: says the variable it needs
        if key not in _BY_NAME:
            near = nearest(key, user_keys, cutoff=_ENV_TYPO_CUTOFF)
            if near:
                raise ConfigError(f"${name}: unknown key {key!r} (did you mean "
                                  f"$KVSTORE_{near.upper()}?)")
    for key, raw in (overrides or {}).items():
        if raw is not None:
            apply(key, raw, "--" + key.replace("_", "-"), internal_ok=True)
    for f in FIELDS:
        if f.name not in values:
            values[f.name] = f.default_value()
    cfg = Config(**values, sources=sources)
    cfg.validate()
    return cfg


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """[dram] bytes = "4GiB" and dram_bytes = "4GiB" are the same key."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}".replace("-", "_")
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        else:
            out[key] = v
    return out


# A KVSTORE_* variable this close to a key is taken for a typo of it (KVSTORE_DRAM_BYTE); farther
# ones (KVSTORE_VLLM_PYTHON, KVSTORE_TEST_*) are other tools' and are not ours to refuse.
_ENV_TYPO_CUTOFF = 0.8


def nearest_key(name: str, cutoff: float = 0.7) -> str | None:
    """The user key most like name (a typo's suggestion), or None when none is close."""
    return nearest(name, [f.name for f in user_fields()], cutoff)
