"""Per-request deadlines: the server's MONOSEMANTIC_REQUEST_TIMEOUT_S, which a client may shorten (a gRPC deadline,
or REST's `X-Request-Timeout: SECONDS` header), never lengthen.

The deadline travels with the request's jobs into the worker's queue (a job past it is never run), and the wait
for an answer is bounded by it, so a request stuck behind heavy work is answered 504 / DEADLINE_EXCEEDED on time.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from typing import Awaitable, TypeVar

from service.errors import ErrorKind, ServiceError, invalid

TIMEOUT_HEADER = "x-request-timeout"
T = TypeVar("T")


def deadline_after(setting_s: float, client_s: float | None = None) -> float:
    """time.monotonic() at which the request's answer is no longer useful."""
    seconds = setting_s if client_s is None else min(setting_s, client_s)
    return time.monotonic() + seconds


def parse_timeout_header(value: str | None) -> float | None:
    """X-Request-Timeout in seconds (a positive number), or None when absent; 422 naming the header otherwise."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise invalid("X-Request-Timeout", f"{value[:40]!r} is not a positive number of seconds")
    return seconds


def exceeded() -> ServiceError:
    return ServiceError(ErrorKind.DEADLINE_EXCEEDED, "the request's deadline passed (setting MONOSEMANTIC_REQUEST_TIMEOUT_S, or the client's shorter one)")


async def within(deadline: float, awaitable: Awaitable[T]) -> T:
    """Await, cancelling the work and raising DEADLINE_EXCEEDED when the deadline passes first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise exceeded()
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(remaining):
                return await awaitable
        return await asyncio.wait_for(awaitable, remaining)
    except TimeoutError:  # asyncio.TimeoutError is TimeoutError from 3.11
        raise exceeded() from None
    except asyncio.TimeoutError:
        raise exceeded() from None
