"""Regenerate the committed protobuf/gRPC modules from proto/kvstore.proto.

Run with `make proto`. tests/unit/test_proto.py calls `generate()` into a temporary directory and
fails if the result differs from the committed files.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent
GENERATED = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    args = [
        "protoc",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "kvstore.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    # protoc writes a top-level import; make it a package import.
    grpc_file = out_dir / "kvstore_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import kvstore_pb2 as", "from kvstore.proto import kvstore_pb2 as"))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in GENERATED:
            (OUT_DIR / name).write_text((Path(tmp) / name).read_text())
    print(f"generated {', '.join(GENERATED)} in {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
