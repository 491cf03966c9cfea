"""Asking the system's services over HTTP, where any answer or failure is a value.

Example::

    async with httpx.AsyncClient() as client:
        outcome = await fetch(client, "http://127.0.0.1:9094/metadata", timeout=1.0)
        outcome.ok, outcome.status, outcome.error   # True, 200, None
        # refused: False, None, "unreachable: connection refused"
        # a 503:   False, 503, "503 owner_unavailable: calculator-9094 does not answer"

A backend that hangs costs the caller at most ``timeout``; :class:`Probe` keeps one
request per target in flight at a time, so a slow target never delays the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One request's result: an answer (any status) or the reason there was none."""

    status: int | None
    """HTTP status; None when no answer came (refused, timed out…)."""
    body: Any
    """The answer's JSON (or its text when it is not JSON); None without an answer."""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    """None for a 2xx answer; else what went wrong, in a few words for a table cell."""
    at: float = field(default_factory=time.time)
    """When the outcome was known (epoch seconds)."""
    ms: float = 0.0
    """How long the request took."""

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return self.error is None

    @property
    def error_code(self) -> str | None:
        """The ``error`` field of a JSON error answer."""
        if isinstance(self.body, dict):
            code = self.body.get("error")
            return code if isinstance(code, str) else None
        return None


def unreachable(exc: Exception, timeout: float) -> str:
    """A request's failure in a few words."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text or "all connection attempts failed" in text:
            return "unreachable: connection refused"
        return f"unreachable: {exc}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"connection broken: {exc}"
    return f"{type(exc).__name__}: {exc}"


def describe_error(status: int, body: Any) -> str:
    """A non-2xx answer in a few words: status, the error code and message of its body."""
    if isinstance(body, dict):
        code = body.get("error")
        message = body.get("message")
        text = f"{status} {code}" if code else str(status)
        return f"{text}: {message}" if message else text
    snippet = str(body or "").strip().replace("\n", " ")[:120]
    return f"{status} {snippet}".strip()


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    timeout: float,
    method: str = "GET",
    params: Mapping[str, str] | None = None,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Outcome:
    """``method url`` as an :class:`Outcome`; never raises for a failed request."""
    started = time.monotonic()
    try:
        # httpx bounds each phase (connect, each read…); this bounds the whole exchange,
        # so that a server trickling its answer cannot hold a cell either.
        async with asyncio.timeout(timeout):
            response = await client.request(
                method, url, params=params, content=content, headers=headers, timeout=timeout
            )
    except (httpx.HTTPError, TimeoutError) as exc:
        return Outcome(
            None, None, error=unreachable(exc, timeout), ms=(time.monotonic() - started) * 1000
        )
    ms = (time.monotonic() - started) * 1000
    body: Any
    if "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = response.text
    else:
        body = response.text
    error = (
        None if 200 <= response.status_code < 300 else describe_error(response.status_code, body)
    )
    return Outcome(response.status_code, body, dict(response.headers), error, ms=ms)


def key_path(location: str, sku: str) -> str:
    """``/inventory/locations/{location}/skus/{sku}`` with the ids percent-encoded, dots
    too (a client would resolve a literal "." segment away)."""
    return f"/inventory/locations/{_encoded(location)}/skus/{_encoded(sku)}"


def _encoded(text: str) -> str:
    return quote(text, safe="").replace(".", "%2E")


class Probe:
    """A target asked again and again, with at most one request in flight."""

    def __init__(self) -> None:
        self.latest: Outcome | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    def busy(self) -> bool:
        """A request is in flight."""
        return self._task is not None and not self._task.done()

    def waiting_for(self) -> float:
        """Seconds the request in flight has been waiting (0 when none is)."""
        return time.time() - self._started if self.busy() else 0.0

    def poll(
        self,
        ask: Callable[[], Awaitable[Outcome]],
        then: Callable[[Outcome], None] | None = None,
    ) -> None:
        """Send ``ask()`` unless a request is still in flight; ``then`` gets its outcome."""
        if self.busy():
            return
        self._started = time.time()
        self._task = asyncio.create_task(self._run(ask, then))

    async def _run(
        self, ask: Callable[[], Awaitable[Outcome]], then: Callable[[Outcome], None] | None
    ) -> None:
        outcome = await ask()
        self.latest = outcome
        if then is not None:
            try:
                then(outcome)
            except Exception:  # a bug in the consumer must not end the polling
                log.exception("handling an outcome failed")

    def cancel(self) -> None:
        """Cancel the request in flight, if any."""
        if self._task is not None:
            self._task.cancel()
