"""kvstore.testing.daemon: the one private-daemon harness of the tests, benches and demo."""
import os

import numpy as np
import pytest

from kvstore.client import KVClient, KVLayout
from kvstore.testing.daemon import DaemonProcess

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_tokens=16, dtype="uint8")


def test_private_daemon_serves_and_close_removes_everything():
    with DaemonProcess.private(dram_bytes=32 << 20, chunk_bytes=4 << 20,
                               extra_args=["--log-level", "info"]) as d:
        with KVClient(d.socket) as c:
            ns = c.namespace("h", LAYOUT)
            keys = ns.block_keys(list(range(32)))
            data = np.arange(2 * LAYOUT.block_bytes, dtype=np.uint64).astype(np.uint8)
            data = data.reshape(2, *LAYOUT.block_shape)
            assert ns.put(keys, data).result() == 2
            assert np.array_equal(np.asarray(ns.get(keys).result()), data)
            assert c.shared_memory and os.path.dirname(c.arena.path) == str(d.shm_dir)
        assert "32.0 MiB" in d.log()                  # the explicit size reached the daemon
        dirs = (d.workdir, d.shm_dir)
    assert d.proc.returncode == 0                     # SIGTERM: a graceful stop
    assert not any(p.exists() for p in dirs)


def test_a_daemon_that_cannot_start_raises_with_its_log_and_leaves_nothing():
    d = DaemonProcess.private(dram_bytes=32 << 20, extra_args=["--dram-bytes", "lots"])
    with pytest.raises(RuntimeError, match=r"daemon exited with 2:\n(.|\n)*dram_bytes"):
        d.start()
    assert not d.workdir.exists() and not d.shm_dir.exists()


def test_stop_keeps_files_kill_is_sigkill(tmp_path, shm_dir):
    d = DaemonProcess(tmp_path, shm_dir, ["--dram-bytes", "32MiB", "--chunk-bytes", "4MiB"])
    d.start()
    d.kill()
    assert d.proc.returncode == -9
    assert list(shm_dir.glob("*.arena")), "a killed daemon leaves its arena"
    d2 = DaemonProcess(tmp_path, shm_dir, ["--dram-bytes", "32MiB", "--chunk-bytes", "4MiB"])
    d2.start()
    assert "left by a daemon that is gone" in d2.log()     # the next one removes it
    assert len(list(shm_dir.glob("*.arena"))) == 1
    assert d2.stop() == 0 and d2.log_path.exists()         # stop() leaves the log
    d2.close()
    d.close()
    assert tmp_path.exists()                               # not the harness's to remove
