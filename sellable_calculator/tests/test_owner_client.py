"""The forwarding client against small real servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sellable_calculator.owner_client import OwnerClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _answer(body: bytes, close: bool = False) -> bytes:
    connection = b"connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-served-by: owner\r\n"
        b"%scontent-length: %d\r\n\r\n%s" % (connection, len(body), body)
    )


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def _with_server(handler: Handler, scenario: Callable[[str], Awaitable[None]]) -> None:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await scenario(f"http://127.0.0.1:{port}")
    finally:
        server.close()


def test_answers_come_back_and_one_connection_is_reused() -> None:
    connections: list[int] = []
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            try:
                request = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            requests.append(request)
            writer.write(_answer(b'{"n": %d}' % len(requests)))

    async def scenario(url: str) -> None:
        client = OwnerClient(max_per_owner=4, idle_timeout=10)
        for n in (1, 2, 3):
            answer = await client.get(url, b"/a%20b?x=1", "calc-0", 2)
            assert (answer.status, answer.body) == (200, b'{"n": %d}' % n)
            assert answer.headers["x-served-by"] == "owner"
            assert answer.headers["content-type"] == "application/json"
        await client.close()

    asyncio.run(_with_server(handler, scenario))
    assert len(connections) == 1
    assert requests[0].startswith(b"GET /a%20b?x=1 HTTP/1.1\r\n")
    assert b"\r\nX-Forwarded-By: calc-0\r\n" in requests[0]


def test_an_idle_connection_the_owner_closed_is_replaced_and_the_get_retried() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        writer.write(_answer(b"{}"))
        await writer.drain()
        writer.close()  # keep-alive announced, then closed: as an idle timeout does

    async def scenario(url: str) -> None:
        client = OwnerClient(max_per_owner=4, idle_timeout=10)
        assert (await client.get(url, b"/", "c", 2)).status == 200
        await asyncio.sleep(0.05)
        assert (await client.get(url, b"/", "c", 2)).status == 200
        await client.close()

    asyncio.run(_with_server(handler, scenario))
    assert served == 2


def test_connection_close_is_honoured() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(_answer(b"{}", close=True))
        await writer.drain()
        writer.close()

    async def scenario(url: str) -> None:
        client = OwnerClient(max_per_owner=4, idle_timeout=10)
        for _ in range(3):
            assert (await client.get(url, b"/", "c", 2)).status == 200
        await client.close()

    asyncio.run(_with_server(handler, scenario))
    assert connections == 3


def test_a_silent_owner_times_out_and_its_connection_is_not_reused() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        if connections == 1:
            await asyncio.sleep(5)  # never answers in time
        writer.write(_answer(b"{}"))

    async def scenario(url: str) -> None:
        client = OwnerClient(max_per_owner=4, idle_timeout=10)
        with pytest.raises(TimeoutError):
            await client.get(url, b"/", "c", 0.2)
        assert (await client.get(url, b"/", "c", 2)).status == 200
        await client.close()

    asyncio.run(_with_server(handler, scenario))
    assert connections == 2


def test_garbage_and_refused_connections_are_connection_errors() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-not-http\r\n\r\n")

    async def scenario(url: str) -> None:
        client = OwnerClient(max_per_owner=4, idle_timeout=10)
        with pytest.raises(ConnectionError):
            await client.get(url, b"/", "c", 2)
        with pytest.raises(OSError):
            await client.get("http://127.0.0.1:1", b"/", "c", 2)
        with pytest.raises(ValueError):
            await client.get("https://127.0.0.1:1", b"/", "c", 2)
        await client.close()

    asyncio.run(_with_server(handler, scenario))


def test_at_most_max_per_owner_requests_run_at_once() -> None:
    in_flight = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, peak
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.02)
            in_flight -= 1
            writer.write(_answer(b"{}"))

    async def scenario(url: str) -> None:
        client = OwnerClient(max_per_owner=3, idle_timeout=10)
        answers = await asyncio.gather(*(client.get(url, b"/", "c", 5) for _ in range(12)))
        assert all(a.status == 200 for a in answers)
        await client.close()

    asyncio.run(_with_server(handler, scenario))
    assert peak == 3
