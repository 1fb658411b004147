"""The committed gRPC stubs must be exactly what the pinned grpcio-tools makes of the .proto."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Loaded by path, never by putting proto/ on sys.path: proto/kvstore/ would then shadow the
# installed kvstore package (as a namespace package) in every process the suite spawns.
_spec = importlib.util.spec_from_file_location("kvstore_proto_generate", REPO / "proto" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_committed_stubs_match_the_proto(tmp_path):
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = REPO / "kvstore" / "v1" / path.name
        assert committed.exists(), f"{committed} is missing: run python proto/generate.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale: run python proto/generate.py and commit the result")
