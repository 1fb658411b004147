"""The runtime adapters' own keys, declared like the daemon's (kvstore.core.settings.Field):
vLLM's ``kv_connector_extra_config`` (kvstore.client.vllm) and SGLang's HiCache ``extra_config``
(kvstore.client.sglang). Parsed by :func:`parse_extra_config`: typed values, defaults for what is
not given, and the daemon configuration's error style — a typo gets "unknown key 'sockt' (did you
mean socket?)", a bad value "io_timeout_s (from kv_connector_extra_config): must be > 0".

This module imports neither vLLM nor SGLang nor torch, so the keys can be checked, listed and
documented (docs/configuration.md) anywhere.
"""
from __future__ import annotations

from typing import Any, Mapping

from kvstore.core.errors import ConfigError
from kvstore.core.layout import QUANT_FORMATS
from kvstore.core.settings import (Field, _bool, _opt_str, _pos_float, _size, _size0, _str,
                                   parse_value, unknown_key_error)
from kvstore.core.units import format_bytes


def _quant(v: Any) -> str:
    s = _str(v)
    if s and s not in QUANT_FORMATS:
        raise ValueError(f"must be one of {', '.join(QUANT_FORMATS)} or empty (not quantized), "
                         f"got {v!r}")
    return s


def _profile(v: Any) -> tuple[float, ...]:
    """[c0, c1, c2]: seconds to prefill k tokens = c0 + c1*k + c2*k^2; empty: not measured."""
    if v in (None, "", [], ()):
        return ()
    if isinstance(v, str):
        v = v.split(",")
    try:
        c = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"must be [c0, c1, c2] (numbers), got {v!r}") from None
    if len(c) != 3 or any(not (x >= 0 and x != float("inf")) for x in c) or not (c[1] or c[2]):
        raise ValueError(f"must be [c0, c1, c2], finite, >= 0, c1 or c2 > 0, got {v!r}")
    return c


_SOCKET = Field("socket", _opt_str, None, "the daemon's Unix socket (unset: the daemon's "
                "default socket)")
_ADDRESS = Field("address", _opt_str, None, "the daemon's TCP host:port instead of the socket "
                 "(block bytes then stream over gRPC)")
_TENANT = Field("tenant", _str, "", "tenant salt of the namespace (tenants never see each "
                "other's blocks)")
_IO_TIMEOUT = Field("io_timeout_s", _pos_float, 5.0, "deadline of each put/get RPC; a slower "
                    "daemon is a miss")
_RETRY = Field("retry_s", _pos_float, 1.0, "after a daemon error, stay off the daemon this long "
               "(doubling while it stays down)")

VLLM_FIELDS: list[Field] = [
    _SOCKET,
    _ADDRESS,
    Field("model_id", _opt_str, None, "namespace model id (unset: vLLM's model path or name)"),
    _TENANT,
    Field("lookup_timeout_s", _pos_float, 0.5, "scheduler: a slower lookup is a miss"),
    _IO_TIMEOUT,
    Field("load_timeout_s", _pos_float, 10.0, "worker: a load not done by then is a failed load "
          "(recomputed)"),
    _RETRY,
    Field("max_pending_store_bytes", _size, 1 << 30, "staging memory held by unfinished puts; "
          "stores beyond it are skipped", format_bytes),
    Field("store_generated", _bool, True, "also store blocks of generated tokens (the next chat "
          "turn's prompt holds this turn's answer)"),
    Field("quant", _quant, "", "int8 or float8_e4m3fn: store blocks quantized (about half the "
          "bytes in every tier); empty: as the engine holds them"),
    Field("remote_flush_timeout_s", _pos_float, 10.0, "kv_producer: a finished request is "
          "reported done once its blocks are readable from the cluster tier, or after this long"),
    Field("sync_load_max_bytes", _size0, 256 << 20, "a hit wholly in this host's DRAM and at "
          "most this big loads in the step that schedules it, on the engine's thread; bigger "
          "or slower hits load asynchronously (0: always asynchronously)", format_bytes),
    Field("prefill_profile", _profile, (), "[c0, c1, c2]: this engine's seconds to prefill k "
          "tokens, c0 + c1*k + c2*k^2 (kvstore bench vllm --slow-tier prints it). Given, a hit "
          "partly on a slow tier (SSD, cluster) loads only the prefix that pays and the engine "
          "computes the rest; empty: every hit loads all it found"),
    Field("device_staging_bytes", _size, 256 << 20, "GPU engines: device memory the "
          "connector's staging may hold at once (unfinished puts' gathered blocks, "
          "asynchronous loads' landing buffers), outside vLLM's own budget; stores beyond it "
          "are skipped, loads beyond it land in host memory", format_bytes),
    Field("layerwise_load", _bool, False, "CPU engines: scatter a synchronous load into the "
          "pages layer by layer on a loader thread while the forward runs the layers already "
          "loaded (false: all layers on the engine thread before the forward, which measured "
          "as fast or faster where the engine's threads use every core)"),
    Field("stream_slow_loads", _bool, False, "CPU engines with layerwise_load: a hit with "
          "blocks on the SSD tier also loads in the step that schedules it, those blocks "
          "arriving layer by layer (AcquireLayers) while the forward runs the layers already "
          "there; with prefill_profile, the split between loading and computing counts that "
          "overlap"),
]

SGLANG_FIELDS: list[Field] = [
    _SOCKET,
    _ADDRESS,
    _TENANT,
    Field("model_id", _opt_str, None, "namespace model id (unset: SGLang's model name)"),
    _IO_TIMEOUT,
    _RETRY,
]
# Keys SGLang itself reads from the same extra_config: not ours, accepted as they are.
SGLANG_OWN_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1",
                             "tp_lcm_size"})


def parse_extra_config(fields: list[Field], raw: Mapping[str, Any] | None, source: str,
                       foreign: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every key of ``fields`` -> its typed value (the default when ``raw`` lacks it); keys in
    ``foreign`` belong to the engine and are skipped. Raises ConfigError (a ValueError) on an
    unknown key, with the nearest known one, or on a bad value, naming the key and ``source``."""
    known = [f.name for f in fields]
    by_name = {f.name: f for f in fields}
    out = {f.name: f.default_value() for f in fields}
    for key, value in (raw or {}).items():
        if key in foreign:
            continue
        f = by_name.get(key)
        if f is None:
            raise unknown_key_error(source, key, known, f"known: {', '.join(known)}")
        out[key] = parse_value(f, value, source)
    return out


__all__ = ["VLLM_FIELDS", "SGLANG_FIELDS", "SGLANG_OWN_KEYS", "parse_extra_config",
           "ConfigError"]
