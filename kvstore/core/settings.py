"""Declared settings: one ``Field`` per key, with its parser, default, help, type and unit.

Two tables use it: the daemon's configuration (``kvstore.daemon.config.FIELDS``: TOML keys,
``KVSTORE_*`` variables and flags) and the adapters' extra-config keys
(``kvstore.client.adapter_config``: vLLM's ``kv_connector_extra_config``, SGLang's
``extra_config``). Both parse with :func:`parse_value` and refuse unknown keys with
:func:`unknown_key_error`, so a typo meets the same "did you mean" wherever it is made, and the
generated reference (``kvstore config --reference``) reads types and units from here.

A field's **type** is its parser's return annotation (``Field(..., type=...)`` overrides it, for a
parser without one); its **unit** is the parser's ``unit`` attribute, else "seconds" for a name
ending in ``_s`` (``unit=`` overrides it). So a row stays ``Field(name, parser, default, help[,
show])`` and still says both.

This module imports only the standard library and kvstore.core: the SDK imports it.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable

from kvstore.core.errors import ConfigError
from kvstore.core.units import parse_rate, parse_size


@dataclass(frozen=True)
class Field:
    """One key. ``default`` is a value, or a function of no arguments computed when a
    configuration is built (an "auto" default: its docstring's first line says what it is)."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    show: Callable[[Any], str] = str
    _: KW_ONLY
    unit: str | None = None      # None: the parser's unit (see the module docstring)
    type: str | None = None      # None: the parser's return annotation, as written
    # Internal keys exist for tests and benchmarks (e.g. slowing a start-up down to observe it):
    # no flag, no TOML key, left out of `config --print`; set only by $KVSTORE_INTERNAL_<KEY>.
    internal: bool = False

    @property
    def type_name(self) -> str:
        """The value's type as Python writes it ("int", "str | None", "tuple[str, ...]")."""
        if self.type is not None:
            return self.type
        ret = inspect.get_annotations(self.parse).get("return")
        if ret is None:
            return "Any"
        return ret if isinstance(ret, str) else inspect.formatannotation(ret)

    @property
    def unit_name(self) -> str:
        """"bytes", "bytes/s", "seconds", ... or "" (a count, a name, a flag)."""
        if self.unit is not None:
            return self.unit
        unit = getattr(self.parse, "unit", "")
        return unit or ("seconds" if self.name.endswith("_s") else "")

    @property
    def is_auto(self) -> bool:
        return callable(self.default)

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def auto_text(self) -> str:
        """What an auto default is, in words (its function's docstring, first sentence)."""
        doc = inspect.getdoc(self.default) or "computed at start-up"
        first = " ".join(doc.split("\n\n")[0].split()).rstrip(".")
        return first[:1].lower() + first[1:]


def parse_value(f: Field, raw: Any, source: str) -> Any:
    """``f.parse(raw)``; raises ConfigError "KEY (from SOURCE): why" on a bad value."""
    try:
        return f.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{f.name} (from {source}): {exc}") from None


def nearest(name: str, known: list[str], cutoff: float = 0.7) -> str | None:
    """The known name most like ``name`` (a typo's suggestion), or None when none is close."""
    near = difflib.get_close_matches(name.lower().replace("-", "_"), known, n=1, cutoff=cutoff)
    return near[0] if near else None


def unknown_key_error(source: str, key: str, known: list[str], listing: str) -> ConfigError:
    """The one error for an unknown key: "SOURCE: unknown key 'K' (did you mean NEAR?)", or,
    with nothing close, a pointer to where the keys are listed."""
    near = nearest(key, known)
    hint = f"did you mean {near}?" if near else listing
    return ConfigError(f"{source}: unknown key {key!r} ({hint})")


# -- parsers: each returns the typed value or raises ValueError saying what was expected -------

def _size(v: Any) -> int:
    return parse_size(v)


_size.unit = "bytes"


def _size0(v: Any) -> int:
    """A size where 0 means off."""
    return 0 if str(v).strip() in ("0", "") else parse_size(v)


_size0.unit = "bytes"


def _rate0(v: Any) -> int:
    try:
        return parse_rate(v)
    except ValueError as exc:
        raise ValueError(f"{exc} (expected e.g. 200MB/s, 1GiB/s, 0 for none)") from None


_rate0.unit = "bytes/s"


def _pos_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"not a number: {v!r}")
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


def _int0(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"not an integer: {v!r}")
    i = int(v)
    if i < 0:
        raise ValueError(f"must be >= 0, got {v!r}")
    return i


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, got {v!r}")
    return v


def _opt_str(v: Any) -> str | None:
    """A string where empty (or None) means "not set"."""
    if v is None:
        return None
    return _str(v) or None


def _names(v: Any) -> tuple[str, ...]:
    """A list of names: a TOML array of strings, or one comma-separated string (env, flag)."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"must be a list of names, got {v!r}")
    return tuple(x.strip() for x in items if x.strip())


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
