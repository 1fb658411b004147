"""The one private-daemon harness: a real `kvstore serve` child process, for the tests, the
benchmarks and `kvstore demo`.

    with DaemonProcess.private(dram_bytes=256 << 20) as d:   # temp socket dir + temp shm dir
        client = KVClient(d.socket)

    d = DaemonProcess(workdir, shm_dir, ["--dram-bytes", "64MiB", ...]).start()   # tests
    ...
    d.stop()     # SIGTERM (graceful): returns the exit status, leaves files for inspection
    d.kill()     # SIGKILL: what a crash leaves behind
    d.close()    # stop, and remove the temporary directories it created (private only)

Contract:
- The daemon listens on ``<workdir>/kv.sock`` and keeps its arena in ``shm_dir``; its stdout
  and stderr go to :attr:`log_path` (read with :meth:`log`).
- :meth:`start` returns once the daemon answers GetStats on its socket (override
  :meth:`_healthy` for a daemon that needs a token) and, by default, once its SSD index is
  loaded (:meth:`ssd_loaded`: a daemon serves DRAM while it loads; tests of that pass
  ``wait_ssd_loaded=False``). If it exits or does not come up within ``timeout_s`` it is stopped, its temporary directories removed (:meth:`close`), and
  RuntimeError raised with its log.
- Every daemon is given its DRAM size explicitly: tests pass ``--dram-bytes``; :meth:`private`
  takes ``dram_bytes``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def temp_shm_dir(prefix: str, fallback: Path | None = None) -> Path:
    """A new private directory in /dev/shm (a tmpfs, like production), or under ``fallback``
    (default: the temporary directory) where /dev/shm is not writable."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else fallback
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


SSD_LOADED = "SSD tier: index loaded"     # the daemon's log line once its SSD index is loaded


class DaemonProcess:
    """A `kvstore serve` child process. stop() is SIGTERM (graceful), kill() is SIGKILL."""

    def __init__(self, workdir: Path, shm_dir: Path, args: list[str], env: dict | None = None,
                 *, owned_dirs: tuple[Path, ...] = ()):
        """``args`` follow --socket and --shm-dir (so they may override neither); ``env`` is
        added to this process's environment; ``owned_dirs`` are removed by :meth:`close`."""
        self.workdir = Path(workdir)
        self.socket = str(self.workdir / "kv.sock")
        self.shm_dir = Path(shm_dir)
        self.args = list(args)
        self.env = env
        self.log_path = self.workdir / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None
        self._owned_dirs = owned_dirs
        self._log = None

    @classmethod
    def private(cls, dram_bytes: int = 512 << 20, chunk_bytes: int = 64 << 20,
                extra_args: list[str] | tuple[str, ...] = (),
                env: dict | None = None) -> "DaemonProcess":
        """A daemon in temporary directories of its own (a socket dir, and a shm dir in
        /dev/shm), removed by :meth:`close`. ``extra_args`` follow the size flags, so a size
        given there overrides them."""
        workdir = Path(tempfile.mkdtemp(prefix="kvstore-private-"))
        shm_dir = temp_shm_dir("kvstore-private-", fallback=workdir)
        args = ["--dram-bytes", str(dram_bytes), "--chunk-bytes", str(chunk_bytes), *extra_args]
        return cls(workdir, shm_dir, args, env, owned_dirs=(shm_dir, workdir))

    def start(self, timeout_s: float = 30.0, wait_ssd_loaded: bool = True) -> "DaemonProcess":
        """Start (or, after stop() or kill(), restart: same socket, same shm dir) the daemon."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--socket", self.socket,
             "--shm-dir", str(self.shm_dir), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"daemon exited with {self.proc.returncode}")
            if os.path.exists(self.socket) and self._healthy() and (
                    not wait_ssd_loaded or self.ssd_loaded()):
                return self
            time.sleep(0.05)
        self._fail(f"daemon did not come up in {timeout_s:g}s")

    def _fail(self, what: str):
        log = self.log()
        self.close()
        raise RuntimeError(f"{what}:\n{log}")

    def _healthy(self) -> bool:
        """The daemon answers on its socket (GetStats, no token)."""
        import grpc

        from kvstore.v1 import kvstore_pb2 as pb
        from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
        try:
            with grpc.insecure_channel(f"unix:{self.socket}") as ch:
                pb_grpc.KVStoreStub(ch).GetStats(pb.GetStatsRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    def ssd_loaded(self) -> bool:
        """The daemon's SSD index is loaded: GetStats shows its SSD capacity ready (or no SSD
        tier); for a daemon that refuses GetStats without a token, its log says so."""
        import grpc

        from kvstore.v1 import kvstore_pb2 as pb
        from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
        try:
            with grpc.insecure_channel(f"unix:{self.socket}") as ch:
                st = pb_grpc.KVStoreStub(ch).GetStats(pb.GetStatsRequest(), timeout=1)
            return all(t.ready_bytes >= t.capacity_bytes for t in st.tiers
                       if t.tier == pb.TIER_SSD)
        except grpc.RpcError:
            text = self.log()
            return "SSD tier: off" in text or SSD_LOADED in text or \
                "loading the index failed" in text

    def log(self) -> str:
        """Everything the daemon wrote so far ("" once its directory is gone)."""
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout_s``); the exit status (0 if never started)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop, and remove the directories this harness created. Idempotent."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        for d in self._owned_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
