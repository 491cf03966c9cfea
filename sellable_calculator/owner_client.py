"""A lean HTTP/1.1 client for the calculator's own hops: a GET to the instance that owns
a key, and the fan-out of a listing to every instance.

Example::

    client = OwnerClient(max_per_owner=100, idle_timeout=2.5)
    answer = await client.get(
        "http://127.0.0.1:9095", b"/inventory/locations/STL/skus/1", "calculator-0", 2.0
    )
    answer.status, answer.headers.get("x-served-by"), answer.body
    await client.close()

Forwarding is the hot path of every key an instance does not own, and a general-purpose
client (aiohttp) spends more CPU on one small GET than the owner spends answering it.
These hops are always the same shape (GET, a path and query, no body) to a server of
this project, so this client does only that: keep-alive connections pooled per owner,
the request written in one piece, the answer parsed by httptools (the parser every
server here already runs on), and one deadline per request. A connection whose exchange
did not finish cleanly (a timeout, a cancelled request, a parse error) is closed, never
reused; a pooled connection that the owner closed just as it was reused (nothing
received) is retried once on a new connection, which is safe for a GET.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


@dataclass(frozen=True, slots=True)
class OwnerAnswer:
    """An instance's answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Exchange(asyncio.Protocol):
    """One keep-alive connection to an instance, carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[OwnerAnswer] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self.closed = False
        self.received = False
        """Whether any byte of the current answer arrived."""
        self.reusable = False
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"not an HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the instance closed the connection"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self._parser.should_keep_alive()
        answer = self._answer
        if answer is not None and not answer.done():
            status = self._parser.get_status_code()
            answer.set_result(OwnerAnswer(status, self._headers, b"".join(self._body)))

    # the client's side

    def send(self, request: bytes) -> asyncio.Future[OwnerAnswer]:
        """Write ``request``; the future gets the answer (or the connection's failure)."""
        assert self._transport is not None
        self._headers, self._body = {}, []
        self.received = self.reusable = False
        self._answer = self._loop.create_future()
        self._transport.write(request)
        return self._answer

    def close(self) -> None:
        """Close the connection (its current answer, if any, fails)."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: BaseException) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(exc)


class OwnerClient:
    """Pooled keep-alive connections to the calculator instances, ``max_per_owner`` at
    most to each (further requests queue), idle ones dropped after ``idle_timeout``."""

    def __init__(self, max_per_owner: int, idle_timeout: float) -> None:
        self._max_per_owner = max_per_owner
        self._idle_timeout = idle_timeout
        self._idle: dict[tuple[str, int], deque[_Exchange]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._addresses: dict[str, tuple[str, int]] = {}

    async def get(
        self, base_url: str, target: bytes, forwarded_by: str, timeout: float
    ) -> OwnerAnswer:
        """GET ``target`` (path and query, as received) from the instance at ``base_url``
        within ``timeout`` seconds, saying it was forwarded by ``forwarded_by``.

        Raises OSError (ConnectionError included) when the instance cannot be reached or
        closes the connection, and TimeoutError when it does not answer in time.
        """
        address = self._address(base_url)
        host = f"{address[0]}:{address[1]}".encode()
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\nX-Forwarded-By: %s\r\n\r\n" % (
            target,
            host,
            forwarded_by.encode(),
        )
        slots = self._slots.get(address)
        if slots is None:
            slots = self._slots[address] = asyncio.Semaphore(self._max_per_owner)
        async with asyncio.timeout(timeout), slots:
            return await self._exchange(address, request)

    async def close(self) -> None:
        """Close every pooled connection."""
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    async def _exchange(self, address: tuple[str, int], request: bytes) -> OwnerAnswer:
        connection = self._pooled(address)
        reused = connection is not None
        if connection is None:
            connection = await self._connect(address)
        try:
            try:
                answer = await connection.send(request)
            except ConnectionError:
                if not (reused and not connection.received):
                    raise
                # The instance closed this idle connection as it was being reused.
                connection = await self._connect(address)
                answer = await connection.send(request)
        except BaseException:
            connection.close()  # its state is unknown: never reuse it
            raise
        if connection.reusable and not connection.closed:
            connection.idle_since = time.monotonic()
            idle = self._idle.setdefault(address, deque())
            while idle and idle[0].closed:  # the instance closed these meanwhile
                idle.popleft()
            idle.append(connection)
        else:
            connection.close()
        return answer

    def _pooled(self, address: tuple[str, int]) -> _Exchange | None:
        idle = self._idle.get(address)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if not connection.closed and now - connection.idle_since < self._idle_timeout:
                return connection
            connection.close()
        return None

    async def _connect(self, address: tuple[str, int]) -> _Exchange:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(lambda: _Exchange(loop), *address)
        return connection

    def _address(self, base_url: str) -> tuple[str, int]:
        address = self._addresses.get(base_url)
        if address is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or parts.hostname is None:
                raise ValueError(f"not an http:// URL of an instance: {base_url!r}")
            address = self._addresses[base_url] = (parts.hostname, parts.port or 80)
        return address
