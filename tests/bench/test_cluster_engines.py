"""The cluster engines the tests and `kvstore bench cluster` start: a port taken between the
pick and the engine's bind costs a restart on new ports, not a failed test."""
from __future__ import annotations

import socket

import pytest

from kvstore.bench import cluster_engines as ce


@pytest.mark.skipif(ce.skip_reason("redis") is not None, reason=str(ce.skip_reason("redis")))
def test_a_port_taken_before_the_bind_restarts_the_cluster_on_new_ports(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))        # bound, not listening: nothing answers on it
    busy = taken.getsockname()[1]
    real = ce.free_ports
    calls = []

    def picks(n):
        # the first cluster's first node gets a port another process bound meanwhile
        calls.append(n)
        got = real(n)
        return [busy] + got[1:] if len(calls) == 1 else got
    monkeypatch.setattr(ce, "free_ports", picks)
    engine = ce.start_engine("redis", tmp_path / "engine")
    try:
        assert busy not in engine.ports and busy not in engine.bus_ports.values()
        ce.RawClient(engine.url)          # the cluster answers on its ports
        assert all(p.poll() is None for p in engine.procs.values())
    finally:
        engine.stop()
        taken.close()
    assert all(p.poll() is not None for p in engine.procs.values())
    assert len(calls) == 2                # started again, once, on new ports


def test_a_failure_other_than_a_taken_port_is_not_retried(tmp_path, monkeypatch):
    starts = []

    class Broken:
        def __init__(self, workdir):
            starts.append(workdir)

        def start(self):
            raise RuntimeError("engine exited with 1: bad configuration")

        def stop(self):
            pass

    monkeypatch.setattr(ce, "RedisCluster", Broken)
    with pytest.raises(RuntimeError, match="bad configuration"):
        ce.start_engine("redis", tmp_path / "engine")
    assert len(starts) == 1
