"""tasync's web application: parts mounted side by side, shared health, OpenAPI and errors."""

import socket

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from tasync.broker.errors import ConfigError
from tasync.producers import intake_http
from tasync.web import WebPart, bind, build_app


async def hello(_: Request) -> Response:
    return PlainTextResponse("hello")


CONSOLE = WebPart("console", [Route("/", hello, methods=["GET"])],
                  {"paths": {"/": {"get": {"summary": "the console",
                                           "responses": {"200": {"description": "page"}}}}}},
                  prefix="/console", health=lambda: {"users": 0})


def test_another_part_mounts_beside_the_intake() -> None:
    intake = WebPart("intake", [], intake_http.openapi_paths(), health=lambda: {"broker": "ok"})
    client = TestClient(build_app([intake, CONSOLE]))
    assert client.get("/console/").text == "hello"
    assert client.get("/healthz").json() == {"ok": True, "intake": {"broker": "ok"},
                                             "console": {"users": 0}}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/alerts", "/alertmanager", "/console/"} <= set(paths)
    missing = client.get("/nothing")
    assert missing.status_code == 404 and "/console/" in missing.json()["error"]
    wrong = client.post("/console/")
    assert wrong.status_code == 405 and "/console/ takes" in wrong.json()["error"]
    assert "GET" in wrong.headers["Allow"]


def test_the_listening_socket_lets_asyncio_turn_nagle_off() -> None:
    # asyncio sets TCP_NODELAY only on sockets whose protocol is IPPROTO_TCP; without it each
    # answer waited for the client's delayed ACK (40 ms).
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        with pytest.raises(ConfigError, match="cannot listen on"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
