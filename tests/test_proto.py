"""The committed gRPC stubs must be exactly what the pinned grpcio-tools makes of the .proto."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "proto"))

import generate  # noqa: E402


def test_committed_stubs_match_the_proto(tmp_path):
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = REPO / "kvstore" / "v1" / path.name
        assert committed.exists(), f"{committed} is missing: run python proto/generate.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale: run python proto/generate.py and commit the result")
