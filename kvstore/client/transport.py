"""What the two front doors' gRPC channels share: the stubs per service. Their message limits come
from the client's `Limits` (`Limits.grpc_options()`: what the SDK may send and a node accepts, and
what a node may answer and the SDK reads)."""

from __future__ import annotations

from kvstore.proto import kvstore_pb2_grpc as pb_grpc

STUBS = {"KV": pb_grpc.KVStub, "Admin": pb_grpc.AdminStub}
