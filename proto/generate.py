"""Regenerate the Python stubs in kvstore/v1/ from proto/kvstore/v1/kvstore.proto.

    python proto/generate.py            # rewrite the committed stubs
    python proto/generate.py --out DIR  # write elsewhere (tests compare the two)

Stubs are committed so that installing kvstore needs no protoc; tests/test_proto.py fails when
they drift from the .proto. Uses the grpcio-tools version pinned in pyproject's test extra.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "kvstore/v1/kvstore.proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main([
        "protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
        str(ROOT / "proto" / PROTO),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted((out / "kvstore" / "v1").glob("kvstore_pb2*"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT)
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
