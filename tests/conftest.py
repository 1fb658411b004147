"""Shared fixtures: real daemon processes on private sockets and private shared-memory dirs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent


class DaemonProcess:
    """A `kvstore serve` child process. stop() is SIGTERM (graceful), kill() is SIGKILL."""

    def __init__(self, workdir: Path, shm_dir: Path, args: list[str], env: dict | None = None):
        self.workdir = workdir
        self.socket = str(workdir / "kv.sock")
        self.shm_dir = shm_dir
        self.args = args
        self.env = env
        self.log_path = workdir / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "DaemonProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--socket", self.socket,
             "--shm-dir", str(self.shm_dir), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket) and self._healthy():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up in {timeout_s}s:\n{self.log()}")

    def _healthy(self) -> bool:
        try:
            with grpc.insecure_channel(f"unix:{self.socket}") as ch:
                pb_grpc.KVStoreStub(ch).GetStats(pb.GetStatsRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> int:
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
        self.stop()
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture
def shm_dir():
    """A private directory in /dev/shm (a tmpfs, like production), removed afterwards."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path("/tmp")
    d = base / f"kvstore-test-{uuid.uuid4().hex[:10]}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon_factory(tmp_path, shm_dir):
    started: list[DaemonProcess] = []

    def make(*args: str, env: dict | None = None, workdir: Path | None = None) -> DaemonProcess:
        wd = workdir or tmp_path / f"d{len(started)}"
        wd.mkdir(exist_ok=True)
        d = DaemonProcess(wd, shm_dir, list(args), env)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.close()


@pytest.fixture
def daemon(daemon_factory):
    """One running daemon with a 256 MiB DRAM tier in 16 MiB chunks."""
    return daemon_factory("--dram-bytes", "256MiB", "--chunk-bytes", "16MiB")
