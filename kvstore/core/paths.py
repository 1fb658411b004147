"""Where a daemon and its clients meet by default: shared by the SDK and the daemon's config."""
from __future__ import annotations

import os
from pathlib import Path


def default_socket() -> str:
    """The default Unix socket: $XDG_RUNTIME_DIR/kvstore/kvstore.sock, else
    /tmp/kvstore-<uid>/kvstore.sock (per user, so users never share a daemon by accident)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "kvstore" if runtime else Path(f"/tmp/kvstore-{os.getuid()}")
    return str(base / "kvstore.sock")
