"""A private kvstore daemon run as a child process, for `kvstore demo` and the benchmarks.

    with PrivateDaemon(dram_bytes=512 << 20) as d:      # temp socket + temp shm dir
        client = KVClient(d.socket)

The child is a real `kvstore serve`; on exit it is stopped with SIGTERM (graceful) and its
temporary directories are removed.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class PrivateDaemon:
    def __init__(self, dram_bytes: int = 512 << 20, chunk_bytes: int = 64 << 20,
                 extra_args: list[str] | None = None):
        """extra_args follow the size flags, so a flag given there overrides them."""
        self.dram_bytes = dram_bytes
        self.chunk_bytes = chunk_bytes
        self.extra_args = list(extra_args or [])
        self.workdir = Path(tempfile.mkdtemp(prefix="kvstore-private-"))
        shm_base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else self.workdir
        self.shm_dir = Path(tempfile.mkdtemp(prefix="kvstore-private-", dir=shm_base))
        self.socket = str(self.workdir / "kv.sock")
        self.log_path = self.workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> "PrivateDaemon":
        from kvstore.client import KVClient, KVStoreError
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--socket", self.socket,
             "--shm-dir", str(self.shm_dir), "--dram-bytes", str(self.dram_bytes),
             "--chunk-bytes", str(self.chunk_bytes), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_text = self.log_path.read_text()
                self.stop()  # removes the temporary directories
                raise RuntimeError(f"kvstore serve exited with {self.proc.returncode}:\n"
                                   f"{log_text}")
            if os.path.exists(self.socket):
                try:
                    KVClient(self.socket, timeout_s=2, shared_memory=False).close()
                    return self
                except KVStoreError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"kvstore serve did not come up in {timeout_s:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PrivateDaemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
