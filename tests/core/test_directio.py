"""kvstore.core.directio: the one O_DIRECT probe (real I/O) of the SSD tier and the benches."""
import mmap
import os

import pytest

from kvstore.core.directio import (ALIGN_BYTES, O_DIRECT, direct_io_works,
                                   directory_supports_direct_io)

pytestmark = pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")


@pytest.mark.parametrize("where", ["tmp_path", "shm_dir"])
def test_the_benches_probe_and_the_ssd_tier_agree(where, request):
    """The benches' directory probe and the SSD tier's own decision for its slab files (an
    O_DIRECT open, then the same real read) come out the same on each filesystem."""
    from kvstore.tiers.ssd.files import SlabFiles
    directory = request.getfixturevalue(where)
    probed = directory_supports_direct_io(directory)
    assert sorted(p.name for p in directory.iterdir()) == []     # the probe's file is gone
    tier = SlabFiles(directory / "ssd", 1 << 20, 1 << 20, io_threads=1)
    tier.open()
    try:
        assert tier.direct == probed
    finally:
        tier.close()


def test_probe_of_a_missing_directory_is_false(tmp_path):
    assert directory_supports_direct_io(tmp_path / "nope") is False


def test_direct_io_works_on_a_direct_descriptor(tmp_path):
    if not directory_supports_direct_io(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    path = tmp_path / "f"
    path.write_bytes(b"\2" * ALIGN_BYTES)
    fd = os.open(path, os.O_RDONLY | O_DIRECT)
    try:
        assert direct_io_works(fd)
        buf = mmap.mmap(-1, ALIGN_BYTES)
        assert os.preadv(fd, [buf], 0) == ALIGN_BYTES and buf[:] == b"\2" * ALIGN_BYTES
    finally:
        os.close(fd)
