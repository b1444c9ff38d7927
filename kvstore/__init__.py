"""kvstore: a sharded, replicated key-value store (LMDB + pysyncobj Raft groups + gRPC)."""

from kvstore.client import (
    AsyncClient,
    CasResult,
    Client,
    Consistency,
    Item,
    ReadConsistency,
    ReadPolicy,
    RetryPolicy,
    ScanPage,
)

__all__ = [
    "AsyncClient",
    "CasResult",
    "Client",
    "Consistency",
    "Item",
    "ReadConsistency",
    "ReadPolicy",
    "RetryPolicy",
    "ScanPage",
]
__version__ = "0.1.0"
