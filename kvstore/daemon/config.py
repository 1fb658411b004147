"""The daemon's configuration: one typed object, built once from

    defaults  ←  TOML file (--config)  ←  KVSTORE_* environment  ←  command-line flags

and validated once. Every key is defined in one table (``FIELDS``) with its type, default and
help; the TOML key, the environment variable (KVSTORE_<KEY>) and the flag (--<key-with-dashes>)
all derive from its name. Errors name the key and where the bad value came from; an unknown key
in the TOML file, or a KVSTORE_* variable that is a near miss of a key, is an error that suggests
the nearest known key (other KVSTORE_* variables belong to other tools and are left alone).
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, make_dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Callable

from kvstore.core.errors import ConfigError
from kvstore.core.paths import default_socket
from kvstore.core.units import format_bytes, parse_rate, parse_size


def _default_dram_bytes() -> int:
    """A quarter of the memory available now, at most 64 GiB, at least 64 MiB."""
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


def _size(v: Any) -> int:
    return parse_size(v)


def _pos_float(v: Any) -> float:
    f = float(v)
    if not f > 0:
        raise ValueError(f"must be > 0, got {v!r}")
    return f


def _pos_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"not an integer: {v!r}")
    i = int(v)
    if i <= 0:
        raise ValueError(f"must be > 0, got {v!r}")
    return i


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, got {v!r}")
    return v


def _names(v: Any) -> tuple[str, ...]:
    """A list of names: a TOML array of strings, or one comma-separated string (env, flag)."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"must be a list of names, got {v!r}")
    return tuple(x.strip() for x in items if x.strip())


def _default_ssd_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "kvstore" / "ssd")


def _size0(v: Any) -> int:
    """A size where 0 means off."""
    return 0 if str(v).strip() in ("0", "") else parse_size(v)


def _int0(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"not an integer: {v!r}")
    i = int(v)
    if i < 0:
        raise ValueError(f"must be >= 0, got {v!r}")
    return i


def _rate0(v: Any) -> int:
    try:
        return parse_rate(v)
    except ValueError as exc:
        raise ValueError(f"{exc} (expected e.g. 200MB/s, 1GiB/s, 0 for none)") from None


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


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {v!r}")


def _port(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"not a port number: {v!r}")
    i = int(v)
    if not 0 <= i <= 65535:
        raise ValueError(f"must be a port in 0..65535 (0: off), got {v!r}")
    return i


def _redacted(v: Any) -> str:
    return "(set)" if v else ""


@dataclass
class Field:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    show: Callable[[Any], str] = str


FIELDS: list[Field] = [
    Field("socket", _str, default_socket, "Unix socket the daemon listens on (mode 0600)"),
    Field("listen", _str, "", "also listen on TCP host:port (off when empty)"),
    Field("dram_bytes", _size, _default_dram_bytes, "DRAM tier size (shared-memory arena)",
          format_bytes),
    Field("chunk_bytes", _size, 64 << 20, "arena chunk size; one block size per chunk",
          format_bytes),
    Field("shm_dir", _str, "/dev/shm", "directory of the shared-memory arena file"),
    Field("dram_prepare_limit", _rate0, 0, "cap on how fast the arena is prepared in the "
          "background after start-up, e.g. 1GB/s (0: none); a testing/QoS knob",
          lambda v: f"{format_bytes(v)}/s" if v else "none"),
    Field("max_batch_blocks", _pos_int, 4096, "most blocks one request may name"),
    Field("max_message_bytes", _size, 64 << 20, "largest gRPC message accepted", format_bytes),
    Field("lease_timeout_s", _pos_float, 30.0, "a get's lease expires after this long"),
    Field("allocation_timeout_s", _pos_float, 30.0, "an uncommitted put expires after this long"),
    Field("log_level", _log_level, "info", "debug, info, warning or error"),
    Field("ssd_dir", _str, _default_ssd_dir, "directory of the SSD tier's slab files and journal"),
    Field("ssd_bytes", _size0, 0, "SSD tier capacity (0: no SSD tier)", format_bytes),
    Field("ssd_segment_bytes", _size0, 0, "size of one preallocated slab file (0: the "
          "directory's own, or capacity/64 within 64 MiB..16 GiB for a new one)", format_bytes),
    Field("ssd_io_threads", _pos_int, 16, "SSD I/O threads (requests in flight)"),
    Field("ssd_write_policy", _write_policy, "write_through",
          "write_through (commit waits for SSD), write_back (written when evicted) or "
          "write_through_selective (written once read ssd_write_hits times; others never)"),
    Field("ssd_write_hits", _pos_int, 1, "write_through_selective: gets of a block before it "
          "is written to SSD"),
    Field("ssd_read_limit", _rate0, 0, "cap on SSD read bandwidth, e.g. 200MB/s (0: none); a "
          "testing/QoS knob", lambda v: f"{format_bytes(v)}/s" if v else "none"),
    Field("ssd_recovery_batch", _pos_int, 4096, "SSD index entries restored per event-loop "
          "turn while the index loads in the background (requests are answered in between)"),
    Field("ssd_recovery_limit", _int0, 0, "cap on how fast the SSD index loads, in blocks/s "
          "(0: none); a testing/QoS knob", lambda v: f"{v} blocks/s" if v else "none"),
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
    Field("metrics_port", _port, 0, "serve /metrics (Prometheus) and the dashboard on this "
          "port (0: off)"),
    Field("metrics_host", _str, "127.0.0.1", "address the metrics port binds"),
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


class _ConfigMethods:
    """Behaviour of Config; its fields come from FIELDS (below), so each key is declared once."""

    sources: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        """Every key's typed value (numbers as numbers), secrets redacted: `config --json`."""
        return {f.name: f.show(getattr(self, f.name)) if f.show is _redacted
                else getattr(self, f.name) for f in FIELDS}

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, value, source) rows for `kvstore config --print`."""
        return [(f.name, f.show(getattr(self, f.name)), self.sources.get(f.name, "default"))
                for f in FIELDS]

    def validate(self) -> None:
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


Config = make_dataclass(
    "Config",
    [(f.name, Any, dc_field(default=None)) for f in FIELDS]
    + [("sources", dict, dc_field(default_factory=dict, repr=False, compare=False))],
    bases=(_ConfigMethods,),
)
Config.__doc__ = "The effective configuration: one attribute per FIELDS entry, plus sources."


def load_config(config_file: str | Path | None = None, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Build and validate the effective configuration. Raises ConfigError naming the key."""
    env = os.environ if env is None else env
    cfg = Config()
    for f in FIELDS:
        setattr(cfg, f.name, f.default() if callable(f.default) else f.default)

    def apply(key: str, raw: Any, source: str) -> None:
        f = _BY_NAME.get(key)
        if f is None:
            near = nearest_key(key)
            hint = (f"did you mean {near}?" if near
                    else "`kvstore config --print` lists the keys")
            raise ConfigError(f"{source}: unknown key {key!r} ({hint})")
        try:
            setattr(cfg, key, f.parse(raw))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{key} (from {source}): {exc}") from None
        cfg.sources[key] = source

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
    for key in _BY_NAME:
        name = f"KVSTORE_{key.upper()}"
        if name in env:
            apply(key, env[name], f"${name}")
    for name in sorted(env):
        key = name.removeprefix("KVSTORE_").lower()
        if name.startswith("KVSTORE_") and key not in _BY_NAME:
            near = nearest_key(key, cutoff=_ENV_TYPO_CUTOFF)
            if near:
                raise ConfigError(f"${name}: unknown key {key!r} (did you mean "
                                  f"$KVSTORE_{near.upper()}?)")
    for key, raw in (overrides or {}).items():
        if raw is not None:
            apply(key, raw, "--" + key.replace("_", "-"))
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
    """The known key most like name (a typo's suggestion), or None when none is close."""
    near = difflib.get_close_matches(name.lower().replace("-", "_"), list(_BY_NAME), n=1,
                                     cutoff=cutoff)
    return near[0] if near else None




