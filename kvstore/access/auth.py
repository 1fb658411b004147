"""Who is calling: bearer tokens, the tenants they stand for, and the tenant salts they may use.

A tokens file has one token per line (``#`` starts a comment):

    TOKEN  TENANT  [SHARED_SALT ...]  [+admin]

The tenant is the salt of that client's namespace digests (so its block keys differ from every
other tenant's). A shared salt listed on the lines of several tenants lets them share prefixes —
the only way tenants share anything, and only when configured. Words starting with ``+`` are
options: ``+admin`` lets that token see the daemon-wide statistics (every other token sees its
own tenant's figures only). ``auth_token`` (usually from ``$KVSTORE_AUTH_TOKEN``) is a single
token for the default tenant "": the operator's own, an admin trusted with the arena. The
daemon re-reads the file on SIGHUP (kvstore.daemon.server).

A caller on the Unix socket without a token is a trusted local client (the socket's file mode
is its access control): it may use any tenant, sees every statistic and maps the shared arena.
With a token it is that token's tenant, and it is offered the shared arena (and the HBM pool)
only when its tenant is listed in ``arena_tenants``: a process that maps the arena can read
every block in it, whoever put it there. Over TCP a token is always required.
"""
from __future__ import annotations

import hashlib
import hmac
import stat
from dataclasses import dataclass
from pathlib import Path

from kvstore.core.errors import ConfigError

MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``salts`` None: trusted local client, any tenant.

    ``admin``: sees the daemon-wide statistics. ``arena``: may map the shared arena and the HBM
    pool (is told where they are and given slot offsets); others move bytes over gRPC only."""
    name: str                       # for logs and per-client limits; never the token itself
    tenant: str | None
    salts: frozenset[str] | None
    admin: bool = False
    arena: bool = False

    def may_use(self, salt: str) -> bool:
        return self.salts is None or salt in self.salts


LOCAL = Principal("local", None, None, admin=True, arena=True)


@dataclass(frozen=True)
class TokenEntry:
    tenant: str
    salts: frozenset[str]
    admin: bool = False
    arena: bool = False       # trusted with the shared arena whatever arena_tenants says


TOKEN_OPTIONS = ("+admin",)


class TokenTable:
    """Constant-time lookup of bearer tokens (tokens are compared by their SHA-256).

    ``arena_tenants``: tenants whose tokens are trusted with the shared arena."""

    def __init__(self, entries: dict[str, TokenEntry], arena_tenants=()):
        self._by_digest = {hashlib.sha256(t.encode()).digest(): (t, e)
                           for t, e in entries.items()}
        self._arena_tenants = frozenset(arena_tenants)

    def __len__(self) -> int:
        return len(self._by_digest)

    def principal(self, token: str) -> Principal | None:
        d = hashlib.sha256(token.encode()).digest()
        hit = self._by_digest.get(d)
        if hit is None or not hmac.compare_digest(hit[0].encode(), token.encode()):
            return None
        e = hit[1]
        return Principal(f"tenant {e.tenant!r} ({d.hex()[:8]})", e.tenant, e.salts,
                         admin=e.admin, arena=e.arena or e.tenant in self._arena_tenants)

    @classmethod
    def from_config(cls, tokens_file: str, auth_token: str, arena_tenants=()) -> "TokenTable":
        """Raises ConfigError naming the file, line and problem."""
        entries: dict[str, TokenEntry] = {}
        if auth_token:
            _check_token(auth_token, "auth_token")
            # The single token is the operator's own (the socket owner's, under
            # socket_requires_token): it sees the daemon-wide statistics and maps the arena.
            entries[auth_token] = TokenEntry("", frozenset({""}), admin=True, arena=True)
        if tokens_file:
            entries.update(parse_tokens_file(Path(tokens_file)))
        return cls(entries, arena_tenants)


def _check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: token is {len(token)} characters; use at least "
                          f"{MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")


def parse_tokens_file(path: Path) -> dict[str, TokenEntry]:
    """Parse a tokens file. Raises ConfigError naming the file, line and problem."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"tokens_file: {path}: {exc.strerror}") from None
    if mode & stat.S_IROTH:
        raise ConfigError(f"tokens_file: {path} is readable by every user (mode "
                          f"{stat.S_IMODE(mode):04o}); chmod o-r it")
    out: dict[str, TokenEntry] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"tokens_file {path} line {n}"
        options = [w for w in words if w.startswith("+")]
        words = [w for w in words if not w.startswith("+")]
        if len(words) < 2:
            raise ConfigError(f"{where}: expected 'TOKEN TENANT [SHARED_SALT ...] [+admin]'")
        for opt in options:
            if opt not in TOKEN_OPTIONS:
                raise ConfigError(f"{where}: unknown option {opt!r} (known: "
                                  f"{', '.join(TOKEN_OPTIONS)})")
        token, tenant, shared = words[0], words[1], words[2:]
        _check_token(token, where)
        if token in out:
            raise ConfigError(f"{where}: duplicate token")
        out[token] = TokenEntry(tenant, frozenset([tenant, *shared]), "+admin" in options)
    return out


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, or None when absent."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def socket_mode(group: str) -> tuple[int, int | None]:
    """(mode, gid) for the Unix socket: 0600, or 0660 owned by ``group`` when configured."""
    if not group:
        return 0o600, None
    import grp
    try:
        gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group!r}") from None
    return 0o660, gid


def tls_credentials(cert_file: str, key_file: str):
    import grpc
    try:
        cert = Path(cert_file).read_bytes()
        key = Path(key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls_cert_file/tls_key_file: {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)])

