"""A get whose SSD promotion outlasts the lease timeout still gets its blocks: the lease's clock
starts when the lease is answered, not when the read began."""
from __future__ import annotations

from kvstore.client import KVClient
from support.ssd import LAYOUT, get_exact, on_ssd


def test_promotion_longer_than_lease_timeout(daemon_factory, tmp_path):
    # 16 blocks of 16 KiB at 100 kB/s: ~2.6 s of reading; leases time out after 1 s.
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path, extra=(
        "--ssd-read-limit", "100kB/s", "--lease-timeout-s", "1"))
    with KVClient(d.socket, timeout_s=30) as c:
        assert get_exact(c.namespace("m", LAYOUT), keys, data) == 16
