"""Turning kvstore errors into gRPC statuses inside a grpc.aio servicer (uses the mapping in errors)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from kvstore import errors

log = logging.getLogger(__name__)

T = TypeVar("T")


def rpc_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Abort the call with the error's status; an unexpected exception becomes INTERNAL (logged)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except errors.KvError as err:
            code, details, metadata = errors.to_grpc_status(err)
            await context.abort(code, details, trailing_metadata=tuple(metadata))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
