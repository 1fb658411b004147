"""BlockStore domain logic, without a server: allocation, eviction, leases, expiry."""
import pytest

from kvstore.core.arena import Arena
from kvstore.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from kvstore.core.keys import chain_keys, pack_keys
from kvstore.core.layout import KVLayout
from kvstore.store.blockstore import ALREADY_STORED, dram_store

L = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16, dtype="float32")  # 8 KiB
assert L.slot_bytes == 8192


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def env(shm_dir):
    arena = Arena.create(1 << 20, shm_dir)  # 1 MiB + header: 4 chunks of 256 KiB = 128 slots
    clock = Clock()
    store = dram_store(arena, chunk_bytes=256 << 10, lease_timeout_s=10,
                       allocation_timeout_s=10, clock=clock)
    ns = store.register_namespace("m", L)
    s = store.open_session("t", 1)
    yield store, ns, s, clock
    arena.close()


def put(store, s, ns, keys, fill=None):
    aid, offs = store.allocate(s.session_id, ns.namespace_id, pack_keys(keys))
    for i, o in enumerate(offs):
        if o >= 0:
            store.dram.arena.buffer[o:o + L.block_bytes] = bytes([(fill or i) % 256]) * L.block_bytes
    store.commit(s.session_id, aid)
    return offs


def chain(n, start=0):
    return chain_keys(b"s" * 16, list(range(start, start + n * 16)), 16)


def test_put_then_lookup_acquire_release(env):
    store, ns, s, _ = env
    keys = chain(5)
    put(store, s, ns, keys)
    assert store.lookup(ns.namespace_id, pack_keys(keys))[0] == 5
    lease, offs, tiers = store.acquire(s.session_id, ns.namespace_id, pack_keys(keys + chain(1, 999)))
    assert len(offs) == 5 and tiers == ["DRAM"] * 5
    assert store.dram.arena.buffer[offs[3]] == 3
    store.release(s.session_id, lease.lease_id)
    with pytest.raises(FailedPrecondition, match="already released"):
        store.release(s.session_id, lease.lease_id)


def test_uncommitted_blocks_are_invisible_and_abort_frees(env):
    store, ns, s, _ = env
    keys = chain(3)
    aid, offs = store.allocate(s.session_id, ns.namespace_id, pack_keys(keys))
    assert store.lookup(ns.namespace_id, pack_keys(keys))[0] == 0
    assert store.acquire(s.session_id, ns.namespace_id, pack_keys(keys))[0] is None
    used = store.dram.slabs.used_bytes()
    store.commit(s.session_id, aid, abort=True)
    assert store.dram.slabs.used_bytes() == used - 3 * L.slot_bytes
    assert store.lookup(ns.namespace_id, pack_keys(keys))[0] == 0
    with pytest.raises(FailedPrecondition):
        store.commit(s.session_id, aid)


def test_second_put_of_same_keys_writes_nothing(env):
    store, ns, s, _ = env
    keys = chain(4)
    put(store, s, ns, keys[:2])
    offs = put(store, s, ns, keys)
    assert offs[:2] == [ALREADY_STORED] * 2 and all(o >= 0 for o in offs[2:])


def test_bad_inputs(env):
    store, ns, s, _ = env
    with pytest.raises(InvalidArgument, match="multiple of 16"):
        store.lookup(ns.namespace_id, b"x" * 20)
    with pytest.raises(NotFound, match="unknown namespace"):
        store.lookup(b"n" * 16, b"")
    with pytest.raises(NotFound, match="unknown session"):
        store.allocate(999, ns.namespace_id, pack_keys(chain(1)))
    with pytest.raises(InvalidArgument, match="duplicate"):
        store.allocate(s.session_id, ns.namespace_id, pack_keys(chain(1) * 2))
    with pytest.raises(InvalidArgument, match="max_batch_blocks"):
        store.lookup(ns.namespace_id, b"k" * 16 * (store.max_batch_blocks + 1))
    with pytest.raises(FailedPrecondition, match="layout mismatch"):
        store.register_namespace("m", KVLayout(1, 1, 64, block_tokens=16, dtype="float16"))
    with pytest.raises(FailedPrecondition, match="allocation 12345"):
        store.commit(s.session_id, 12345)


def test_full_arena_evicts_lru_leaves_first_and_never_leased(env):
    store, ns, s, _ = env
    slots = store.dram.slabs.n_chunks * (store.dram.slabs.chunk_bytes // L.slot_bytes)
    old = chain(slots // 2, start=0)
    new = chain(slots // 2, start=10**6)
    put(store, s, ns, old)
    put(store, s, ns, new)
    lease, _, _ = store.acquire(s.session_id, ns.namespace_id, pack_keys(old[:4]))
    more = chain(8, start=2 * 10**6)
    put(store, s, ns, more)
    assert store.dram.counters.evictions == 8
    # the leased roots survive; the leaves of the oldest chain went first
    assert store.lookup(ns.namespace_id, pack_keys(old))[0] == len(old) - 8
    assert store.lookup(ns.namespace_id, pack_keys(new))[0] == len(new)
    store.release(s.session_id, lease.lease_id)


def test_everything_leased_is_resource_exhausted(env):
    store, ns, s, _ = env
    slots = store.dram.slabs.n_chunks * (store.dram.slabs.chunk_bytes // L.slot_bytes)
    keys = chain(slots)
    put(store, s, ns, keys)
    store.acquire(s.session_id, ns.namespace_id, pack_keys(keys))
    with pytest.raises(ResourceExhausted, match="DRAM tier full"):
        store.allocate(s.session_id, ns.namespace_id, pack_keys(chain(1, 10**7)))
    assert store.counters.puts_rejected == 1


def test_partial_room_stores_a_prefix(env):
    store, ns, s, _ = env
    slots = store.dram.slabs.n_chunks * (store.dram.slabs.chunk_bytes // L.slot_bytes)
    keys = chain(slots - 2)
    put(store, s, ns, keys)
    store.acquire(s.session_id, ns.namespace_id, pack_keys(keys))
    offs = put(store, s, ns, chain(5, 10**7))
    assert [o >= 0 for o in offs] == [True, True, False, False, False]


def test_expired_lease_release_says_discard(env):
    store, ns, s, clock = env
    keys = chain(2)
    put(store, s, ns, keys)
    lease, _, _ = store.acquire(s.session_id, ns.namespace_id, pack_keys(keys))
    clock.t += 11
    store.expire()
    assert store.counters.leases_expired == 1
    with pytest.raises(FailedPrecondition, match="expired"):
        store.release(s.session_id, lease.lease_id)
    assert int(store.table.leases[store.table.find(ns.index, keys[0])]) == 0


def test_expired_allocation_quarantines_slots_until_session_ends(env):
    store, ns, s, clock = env
    aid, offs = store.allocate(s.session_id, ns.namespace_id, pack_keys(chain(2)))
    clock.t += 11
    store.expire()
    used = store.dram.slabs.used_bytes()
    assert used == 2 * L.slot_bytes  # still held: the writer may still be writing
    with pytest.raises(FailedPrecondition):
        store.commit(s.session_id, aid)
    assert store.quarantined_bytes() == 2 * L.slot_bytes
    store.close_session(s.session_id)
    # The session's "process" (pid 1) does not map the arena: no writer the daemon can watch,
    # so the slots come back quarantine_timeout_s after the session ended (kvstore/store/
    # writers.py; a watched writer's, once its process exits or unmaps: test_late_writes.py).
    assert store.dram.slabs.used_bytes() == 2 * L.slot_bytes
    clock.t += store.quarantine_timeout_s
    store.expire()
    assert store.dram.slabs.used_bytes() == 0
    assert store.quarantined_bytes() == 0


def test_session_close_reclaims_leases_and_allocations(env):
    store, ns, s, clock = env
    keys = chain(3)
    put(store, s, ns, keys)
    store.acquire(s.session_id, ns.namespace_id, pack_keys(keys))
    store.allocate(s.session_id, ns.namespace_id, pack_keys(chain(2, 5000)))
    store.close_session(s.session_id)
    idx = store.table
    assert all(int(idx.leases[idx.find(ns.index, k)]) == 0 for k in keys)
    assert store.lookup(ns.namespace_id, pack_keys(chain(2, 5000)))[0] == 0
    # the open allocation's slots: quarantined until its writer cannot write them (here, an
    # unwatched writer: quarantine_timeout_s after the session ended)
    assert store.quarantined_bytes() == 2 * L.slot_bytes
    clock.t += store.quarantine_timeout_s
    store.expire()
    assert store.dram.slabs.used_bytes() == 3 * L.slot_bytes


def test_delete_of_leased_block_waits_for_release(env):
    store, ns, s, _ = env
    keys = chain(2)
    put(store, s, ns, keys)
    lease, offs, _ = store.acquire(s.session_id, ns.namespace_id, pack_keys(keys))
    assert store.delete(ns.namespace_id, pack_keys(keys)) == 2
    assert store.lookup(ns.namespace_id, pack_keys(keys))[0] == 0
    assert store.dram.slabs.used_bytes() == 2 * L.slot_bytes  # slots still leased
    store.release(s.session_id, lease.lease_id)
    assert store.dram.slabs.used_bytes() == 0


def test_two_block_sizes_share_the_arena_and_steal_chunks(env):
    store, ns, s, _ = env
    big = store.register_namespace("big", KVLayout(1, 1, 64, block_tokens=64, dtype="float32"))
    small_keys = chain(128)  # fills all 4 chunks with 8 KiB slots
    put(store, s, ns, small_keys)
    assert store.dram.slabs.used_bytes() == 128 * 8192
    keys = chain_keys(b"b" * 16, list(range(64 * 3)), 64)
    aid, offs = store.allocate(s.session_id, big.namespace_id, pack_keys(keys))
    assert all(o >= 0 for o in offs)
    store.commit(s.session_id, aid)
    assert store.lookup(big.namespace_id, pack_keys(keys))[0] == 3
    # blocks of two sizes never share a chunk
    cls_small = store.dram.slabs.classes[8192]
    cls_big = store.dram.slabs.classes[32768]
    chunks = lambda c: {sp.first_chunk for sp in c.spans}
    assert not chunks(cls_small) & chunks(cls_big)
    assert store.lookup(ns.namespace_id, pack_keys(small_keys))[0] < 128
