"""The kvstore SDK: one core (core.py), two front doors (sync.Client, aio.AsyncClient)."""

from kvstore.client.aio import AsyncClient
from kvstore.client.core import Consistency, ReadConsistency, ReadPolicy
from kvstore.client.results import CasResult, Item, ScanPage
from kvstore.client.retry import RetryPolicy
from kvstore.client.sync import Client

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
