"""The kvstore SDK: one core (core.py), two front doors (sync.Client, aio.AsyncClient)."""

from kvstore.client.aio import AsyncClient
from kvstore.client.api import CasResult, Item, ScanPage
from kvstore.client.core import Consistency, ReadConsistency, ReadPolicy
from kvstore.client.sync import Client

__all__ = [
    "AsyncClient",
    "CasResult",
    "Client",
    "Consistency",
    "Item",
    "ReadConsistency",
    "ReadPolicy",
    "ScanPage",
]
