"""LMCache as the peer of `kvstore bench vllm --peer lmcache`: finding its environment, running
its multi-process cache server on CPU, and the vLLM connector config that points at it.

LMCache and kvstore's connector must run in one vLLM environment (same vLLM, same torch, so the
engines differ only in their cache). The comparison therefore needs a vLLM environment with
``lmcache`` and this kvstore installed; NO_ENV_HELP says how to make one. The server runs in
``engine_driven`` transfer mode, the one a CPU engine accepts.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from kvstore.bench.vllm_engine import REPO, VLLM_VERSION

LMCACHE_VERSION = "0.5.6"
ENV_VAR = "KVSTORE_LMCACHE_PYTHON"
DEFAULT_ENV = REPO / ".venv-lmcache"

NO_ENV_HELP = (
    f"no LMCache environment found: set ${ENV_VAR} or --lmcache-python to the python of a vLLM "
    f"environment with lmcache and kvstore installed (looked in {DEFAULT_ENV} too). To make one "
    f"from the vLLM environment: cp -a ~/.cache/kvstore-ci/vllm-{VLLM_VERSION} .venv-lmcache && "
    f".venv-lmcache/bin/python -m pip install lmcache=={LMCACHE_VERSION} && "
    f".venv-lmcache/bin/python -m pip install --no-deps protobuf==7.36.2 grpcio==1.85.3 "
    f"numpy==2.3.5 && .venv-lmcache/bin/python -m pip install --no-deps -e .   (lmcache "
    f"downgrades protobuf below what kvstore's generated code needs; the second step puts the "
    f"vLLM environment's versions back)")

# Telemetry off: a benchmark must not phone home, and the box may have no network.
QUIET_ENV = {"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1"}

_PROBE = ("import importlib.util as u, sys\n"
          "missing = [m for m in ('vllm', 'lmcache', 'kvstore.client') if u.find_spec(m) is None]\n"
          "if missing: sys.exit('missing modules: ' + ', '.join(missing))\n"
          "import kvstore.client  # fails when protobuf is older than kvstore's generated code\n")


def find_lmcache_python(explicit: str | None = None) -> tuple[str | None, str]:
    """(interpreter, "") of an environment with vLLM, LMCache and kvstore, or (None, why not).

    Looked for in order: ``explicit`` (--lmcache-python), $KVSTORE_LMCACHE_PYTHON,
    <repo>/.venv-lmcache. An explicitly named interpreter that does not work is reported as
    such, never silently replaced by another.
    """
    named = explicit or os.environ.get(ENV_VAR)
    candidates = [named] if named else [str(DEFAULT_ENV / "bin" / "python")]
    for py in candidates:
        if not os.path.exists(py):
            why = f"{py} does not exist"
        else:
            r = subprocess.run([py, "-c", _PROBE], check=False, capture_output=True, text=True,
                               timeout=120, cwd="/")
            if r.returncode == 0:
                return py, ""
            why = f"{py} cannot run the comparison: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
        if named:
            return None, f"{why}; {NO_ENV_HELP}"
    return None, NO_ENV_HELP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LMCacheServer:
    """``python -m lmcache.cli.main server`` on loopback, started and stopped by its owner.

    ``connector_config()`` is the vLLM KVTransferConfig (as keyword arguments) of an engine
    that uses this server.
    """

    READY_LINE = "LMCache cache server is running"

    def __init__(self, py: str, log_path: str, *, chunk_tokens: int = 256,
                 l1_gib: int = 2, start_timeout_s: float = 300.0):
        self.port = _free_port()
        http_port = _free_port()
        self.log_path = log_path
        args = [py, "-m", "lmcache.cli.main", "server", "--host", "127.0.0.1",
                "--port", str(self.port), "--http-port", str(http_port),
                "--chunk-size", str(chunk_tokens), "--l1-size-gb", str(l1_gib),
                "--eviction-policy", "LRU", "--supported-transfer-mode", "engine_driven"]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd="/", env=dict(os.environ, **QUIET_ENV),
                                     start_new_session=True)
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LMCache server exited ({self.proc.returncode}): "
                                   f"{self._tail()}; log: {self.log_path}")
            if self.READY_LINE in Path(self.log_path).read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"LMCache server not ready in {timeout_s}s; log: {self.log_path}")

    def _tail(self) -> str:
        lines = [ln for ln in Path(self.log_path).read_text(errors="replace").splitlines()
                 if ln.strip()]
        return lines[-1] if lines else "(no output)"

    def connector_config(self) -> dict:
        return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1",
                                              "lmcache.mp.port": self.port}}

    def stop(self) -> None:
        # The server runs in its own session: signal its group, so any worker it forked goes too.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "LMCacheServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
