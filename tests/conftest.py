"""Shared fixtures: real daemon processes on private sockets and private shared-memory dirs
(the harness is kvstore.testing.daemon's, the same one the benchmarks and the demo use)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvstore.testing.daemon import DaemonProcess, temp_shm_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def shm_dir():
    """A private directory in /dev/shm (a tmpfs, like production), removed afterwards."""
    d = temp_shm_dir("kvstore-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon_factory(tmp_path, shm_dir):
    """make(*serve_args, env=None, workdir=None) starts one more daemon in ``shm_dir`` (its
    socket in ``workdir``, default a new dir under tmp_path); all are closed at the end."""
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
