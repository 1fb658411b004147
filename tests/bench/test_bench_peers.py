"""`kvstore bench peers` through the real CLI: every store measured on one small workload, every
byte checked, Redis measured or the exact reason it was not, bad options refused in one line."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvstore.bench.peer_stores import NO_CLIENT, NO_SERVER
from kvstore.bench.peers import filesystem_type

SMALL = ["--blocks", "32", "--block-kib", "64", "--batch", "4", "--repeat", "2"]


def _bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", "peers", *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def disk_dir(tmp_path):
    """An empty directory on a disk: pytest's own unless /tmp is a tmpfs (the bench refuses)."""
    if filesystem_type(str(tmp_path)) not in ("tmpfs", "ramfs"):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="kvstore-test-peers-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_peers_small_run_measures_every_store_and_checks_bytes(disk_dir):
    r = _bench("--json", "--dir", str(disk_dir), *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    stores = res["stores"]
    assert set(stores) == {"kvstore-dram", "kvstore-ssd", "files", "files-odirect", "redis"}
    assert res["bytes_verified"] is True
    measured = {n: s for n, s in stores.items() if s["measured"]}
    if not stores["redis"]["measured"]:
        assert stores["redis"]["reason"] in (NO_SERVER, NO_CLIENT)
    for name, s in measured.items():
        assert s["verified"] is True and s["mismatched_blocks"] == 0, name
        assert s["blocks_read"] == s["blocks_asked"] == 32 * 2, name
        assert s["put_gbps"] > 0 and s["get_gbps"] > 0 and len(s["get_gbps_rounds"]) == 2
    for name, base in (("files", "kvstore-dram"), ("files-odirect", "kvstore-ssd"),
                       ("redis", "kvstore-dram")):
        if name not in measured:
            continue
        s = measured[name]
        assert s["compared_with"] == base
        for k in ("put_vs_kvstore", "get_vs_kvstore", "kvstore_put_speedup",
                  "kvstore_get_speedup"):
            assert s[k] > 0, (name, k)
        assert s["get_vs_kvstore"] * s["kvstore_get_speedup"] == pytest.approx(1)
        assert s["get_vs_kvstore"] == pytest.approx(s["get_gbps"] / stores[base]["get_gbps"])
    # The SSD store's DRAM tier holds at most half the set and each round scans it oldest
    # first: its gets are SSD reads, not DRAM hits.
    assert stores["kvstore-ssd"]["ssd_hits"] >= 0.9 * stores["kvstore-ssd"]["blocks_read"]
    assert list(disk_dir.iterdir()) == []      # files, SSD slabs and journal removed


def test_peers_human_table_and_no_redis(disk_dir):
    r = _bench("--no-redis", "--dir", str(disk_dir), *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("kvstore-dram", "kvstore-ssd", "files", "files-odirect"):
        assert f"  {name} " in r.stdout
    assert "redis: not measured: left out (--no-redis)" in r.stdout
    assert "every byte read back equals the bytes written" in r.stdout


def test_peers_puts_in_flight_verify_every_byte(disk_dir):
    # 48 blocks of 4: the SSD store's DRAM holds 4 + 2 batches, under half the set
    r = _bench("--json", "--no-redis", "--inflight", "2", "--dir", str(disk_dir),
               "--blocks", "48", "--block-kib", "64", "--batch", "4", "--repeat", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["workload"]["put_inflight"] == 2 and out["bytes_verified"] is True
    for name in ("kvstore-dram", "kvstore-ssd", "files", "files-odirect"):
        s = out["stores"][name]
        assert s["verified"] and s["blocks_read"] == s["blocks_asked"] == 48
        assert s["put_gbps"] > 0
    assert out["stores"]["kvstore-ssd"]["ssd_hits"] >= 0.9 * 48


@pytest.mark.parametrize("args, message", [
    (["--block-kib", "48"], "--block-kib must be a positive multiple of 32"),
    (["--blocks", "30", "--batch", "4"], "--blocks must be a multiple of --batch"),
    (["--blocks", "16", "--batch", "4"], "--blocks must be at least 8 x --batch"),
    (["--repeat", "0"], "--repeat must be positive"),
    (["--inflight", "0"], "--inflight must be positive"),
    (["--inflight", "4", "--blocks", "32", "--batch", "4"],
     "--blocks must be at least 16 x --batch with --inflight 4"),
    (["--dir", "/nonexistent/x"], "--dir /nonexistent/x: not a writable directory"),
    (["--dir", "/dev/shm"], "--dir /dev/shm: on tmpfs, not a disk"),
    (["--redis-url", "http://localhost:6379"], "--redis-url must start with redis://"),
    (["--redis-server", "/nonexistent/redis-server"], "not an executable file"),
])
def test_peers_bad_options_exit_2_with_one_line(args, message):
    r = _bench(*args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore bench peers: ") and message in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("redis") is None,
                    reason="needs kvstore-offload[peers]")
def test_peers_unreachable_redis_url_fails_in_one_line(disk_dir):
    r = _bench("--dir", str(disk_dir), "--redis-url", f"unix://{disk_dir}/none.sock", *SMALL)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore bench peers: "), r.stderr
    assert list(disk_dir.iterdir()) == []      # daemons stopped, work directory removed
