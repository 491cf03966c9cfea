"""The server's own answers to requests that never reach an application: a real uvicorn
on httptools + uvloop in a thread, with the default limits, over raw sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from local_stack.process import free_port
from service_runtime.server import server_config, start_in_thread
from service_runtime.settings import HttpServerSettings


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: str) -> dict[str, int]:
        return {"length": len(item)}

    number = free_port()
    server, thread = start_in_thread(
        server_config(app, "127.0.0.1", number, "warning", HttpServerSettings())
    )
    yield number
    server.should_exit = True
    thread.join(timeout=10)


def _ask(port: int, target: str) -> tuple[int, dict[str, object]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_long_target_within_the_parser_reaches_the_application(port: int) -> None:
    status, body = _ask(port, "/items/" + "%C3%A9" * 10_000)  # 60 KB, 10,000 characters
    assert (status, body) == (200, {"length": 10_000})


def test_a_target_too_long_for_the_parser_is_414_in_words(port: int) -> None:
    # A 64 KiB id of "é", percent-encoded: 393,216 bytes, over the parser's 65,535.
    status, body = _ask(port, "/items/" + "%C3%A9" * 65_536)
    assert status == 414 and body["error"] == "uri_too_long", body
    assert "65535" in str(body["message"])


def test_a_request_that_is_not_http_is_400_in_json(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"HELLO\x00 there\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "malformed_request"
