"""The committed generated code must match proto/kvstore.proto (regenerate with `make proto`)."""

from __future__ import annotations

from pathlib import Path

from kvstore.proto import generate


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for name in generate.GENERATED:
        committed = (generate.OUT_DIR / name).read_text()
        fresh = (tmp_path / name).read_text()
        assert committed == fresh, (
            f"kvstore/proto/{name} is out of date with proto/kvstore.proto: run `make proto`"
        )


def test_every_rpc_has_a_servicer_method() -> None:
    from kvstore.proto import kvstore_pb2 as pb
    from kvstore.server.node import AdminServicer, KVServicer
    from kvstore.server.router import RouterServicer

    for service, classes in (("KV", (KVServicer, RouterServicer)), ("Admin", (AdminServicer,))):
        for method in pb.DESCRIPTOR.services_by_name[service].methods:
            for cls in classes:
                assert method.name in cls.__dict__, f"{cls.__name__} does not implement {method.name}"
