"""What the two front doors' gRPC channels share: the stubs per service and the channel options."""

from __future__ import annotations

from kvstore.config import Limits
from kvstore.proto import kvstore_pb2_grpc as pb_grpc

STUBS = {"KV": pb_grpc.KVStub, "Admin": pb_grpc.AdminStub}
# The same message limits as a node with the default Limits (derived there from the request and
# answer limits): what the SDK may send, a node accepts, and what a node may answer, the SDK reads.
CHANNEL_OPTIONS = Limits().grpc_options()
