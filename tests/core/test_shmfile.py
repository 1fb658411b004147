"""kvstore.core.shmfile: the private shared-memory file under the arena, slot generations and
index snapshot, and the removal of what killed daemons leave behind."""
import os
import stat
import subprocess
import sys

import pytest

from kvstore.core import shmindex, slotgen
from kvstore.core.arena import Arena, ArenaError
from kvstore.core.shmfile import ShmFile, arena_path, companion_path, remove_orphans


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_create_is_private_exclusive_and_leaves_nothing_on_failure(tmp_path):
    f = ShmFile.create(tmp_path / "a.arena", 8192)
    assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
    assert os.stat(f.path).st_size == 8192 and len(f.mm) == 8192
    f.mm[:4] = b"abcd"
    with pytest.raises(FileExistsError):                 # never reuses an existing file
        ShmFile.create(tmp_path / "a.arena", 4096)
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.arena")
    with pytest.raises(FileExistsError):                 # nor follows a planted link
        ShmFile.create(tmp_path / "link.arena", 4096)
    assert not (tmp_path / "elsewhere").exists()
    reader = ShmFile.open(f.path, RuntimeError, "thing")
    assert reader.map(4096, writable=False)[:4] == b"abcd"
    with pytest.raises(TypeError):                       # read-only mapping
        reader.mm[0] = 1
    reader.close()
    assert f.path.exists()                               # a reader never unlinks
    f.close()
    f.close()                                            # idempotent
    assert not f.path.exists()

    with pytest.raises(ValueError, match="sizing: "):    # a failed sizing: no file left
        ShmFile.create(tmp_path / "b.arena", -1, size_error=lambda e: ValueError(f"sizing: {e}"))
    assert not (tmp_path / "b.arena").exists()


def test_open_and_attach_errors_keep_their_classes_and_messages(tmp_path):
    with pytest.raises(ArenaError, match=r"cannot open arena .*nope\.arena"):
        Arena.attach(tmp_path / "nope.arena", b"u" * 16, 8192)
    with pytest.raises(slotgen.SlotGenerationsError, match="cannot open slot generations"):
        slotgen.SlotGenerations.attach(tmp_path / "nope.arena", b"u" * 16)
    with pytest.raises(shmindex.ShmIndexError, match="cannot open index snapshot"):
        shmindex.ShmIndex.attach(tmp_path / "nope.arena.index", b"u" * 16)
    arena = Arena.create(1 << 20, tmp_path)
    gens = slotgen.SlotGenerations.create(arena.path, arena.uuid, arena.size_bytes)
    snap = shmindex.ShmIndex.create(arena.path, arena.uuid, buckets=64)
    try:
        assert gens.path == companion_path(arena.path, ".slotgen")
        assert snap.path == companion_path(arena.path, ".index")
        with pytest.raises(ArenaError, match="uuid mismatch"):
            Arena.attach(arena.path, b"x" * 16, arena.size_bytes)
        with pytest.raises(slotgen.SlotGenerationsError, match="belongs to another arena"):
            slotgen.SlotGenerations.attach(arena.path, b"x" * 16)
        with pytest.raises(shmindex.ShmIndexError, match="belongs to another arena"):
            shmindex.ShmIndex.attach(snap.path, b"x" * 16)
        client = slotgen.SlotGenerations.attach(arena.path, arena.uuid)
        gens.bump(8192)
        assert client.read([8192, 0]) == [1, 0]
        client.close()
        for p in (arena.path, gens.path, snap.path):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    finally:
        snap.close()
        gens.close()
        arena.close()
    assert list(tmp_path.iterdir()) == []                # the owner removed all three


def test_remove_orphans_takes_dead_daemons_files_and_nothing_else(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f"kvstore-{dead}-deadbeef.arena"
    stale_companions = [companion_path(stale, s) for s in (".slotgen", ".index")]
    lone = tmp_path / "kvstore-1-0badf00d.arena.index"   # its arena is gone already
    live = tmp_path / f"kvstore-{os.getppid()}-11111111.arena"     # a running process's
    live_companion = companion_path(live, ".slotgen")
    mine = arena_path(tmp_path, "kvstore", "22222222")   # this process's own
    other_prefix = tmp_path / f"kvstorehbm-{dead}-33333333.arena"
    unrelated = tmp_path / f"kvstore-{dead}.log"
    for p in [stale, *stale_companions, lone, live, live_companion, mine, other_prefix,
              unrelated]:
        p.write_bytes(b"x")
    removed = remove_orphans(tmp_path)
    assert sorted(removed) == sorted([stale, *stale_companions, lone])
    assert sorted(tmp_path.iterdir()) == sorted(
        [live, live_companion, mine, other_prefix, unrelated])
    assert remove_orphans(tmp_path, prefix="kvstorehbm") == [other_prefix]
    assert remove_orphans(tmp_path) == []
