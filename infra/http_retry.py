"""How the project's HTTP clients ride out a gateway that refuses (503 OVERLOADED, 429 RATE_LIMITED) or restarts.

One logical call is retried until its deadline, never past it:

- a 429 or 503 answer (the gateway refuses with it: OVERLOADED, RATE_LIMITED, UNAVAILABLE) is retried after its
  ``Retry-After`` (capped, a little jitter), for every call; one whose ``Retry-After`` lies past the deadline
  (a used-up daily quota) fails at once;
- a transport error (connection refused or reset, a timeout) may hide work already done, so it is retried only
  for an idempotent call: a GET or PUT, or a POST that carries an ``Idempotency-Key`` (the same key on every
  attempt: the gateway answers a replay with the resource the first attempt made);
- at the deadline the last refusal or error is raised as ``DeadlineExceeded``, naming the call and the attempts.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 503})


class RefusedError(RuntimeError):
    """A 429/503 answer: the server asks the caller to come back (after ``retry_after``)."""

    def __init__(self, status: int, body: object, retry_after: str | None):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


class DeadlineExceeded(TimeoutError):
    """A call still refused (or unreachable) when its deadline came."""


@dataclass(frozen=True)
class RetryPolicy:
    max_wait_s: float = 30.0  # the longest single wait, whatever Retry-After says
    backoff_initial_s: float = 0.5  # after a transport error, or a refusal without Retry-After; doubles
    backoff_max_s: float = 8.0
    jitter: float = 0.2  # each wait is stretched by up to this fraction, so refused callers do not return together


DEFAULT_POLICY = RetryPolicy()


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_idempotent(method: str, headers: dict[str, str] | None) -> bool:
    return method.upper() in ("GET", "HEAD", "PUT", "DELETE") or "Idempotency-Key" in (headers or {})


async def call_with_retries(send: Callable[[], Awaitable[T]], *, what: str, deadline: float, idempotent: bool,
                            policy: RetryPolicy = DEFAULT_POLICY,
                            sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                            clock: Callable[[], float] = time.monotonic,
                            rand: Callable[[], float] = random.random) -> T:
    """``send()`` until it returns, or raises something not retried, or ``deadline`` (a ``clock`` time) comes.

    ``send`` raises ``RefusedError`` for a 429/503 answer; aiohttp's connection errors and ``TimeoutError`` are
    transport errors."""
    attempts = 0
    backoff = policy.backoff_initial_s
    while True:
        attempts += 1
        try:
            return await send()
        except RefusedError as exc:
            hinted = retry_after_s(exc.retry_after)
            wait = min(policy.max_wait_s, hinted if hinted is not None else backoff)
            last: BaseException = exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            if not idempotent:
                raise
            hinted, wait, last = None, min(policy.max_wait_s, backoff), exc
        backoff = min(policy.backoff_max_s, backoff * 2)
        wait *= 1 + policy.jitter * rand()
        remaining = deadline - clock()
        if wait >= remaining or (hinted is not None and hinted >= remaining):  # e.g. a daily quota used up
            raise DeadlineExceeded(f"{what}: {_describe(last)} after {attempts} attempt(s); the deadline comes "
                                   f"in {max(0.0, remaining):.0f} s, before it may be tried again") from last
        await sleep(wait)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RefusedError):
        return str(exc)[:300]
    return f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
