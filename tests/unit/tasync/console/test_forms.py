import asyncio

import httpx
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from tasync.console.common import read_form


def request_of(built: httpx.Request) -> Request:
    body = built.read()
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(k.lower().encode(), v.encode()) for k, v in built.headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers},
                   receive)


def upload() -> httpx.Request:
    return httpx.Request("POST", "http://console/config/import", data={"csrf": "t0ken"},
                         files={"file": ("config.json", b'{"a":\r\n 1}\n\xe2\x82\xac\x00',
                                         "application/json")})


def test_a_multipart_form_is_read_where_uploads_are_taken_bytes_intact() -> None:
    form = asyncio.run(read_form(request_of(upload()), max_upload_bytes=1 << 20))
    assert dict(form) == {"csrf": "t0ken"}
    assert form.files["file"].filename == "config.json"
    assert form.files["file"].data == b'{"a":\r\n 1}\n\xe2\x82\xac\x00'


def test_elsewhere_a_multipart_form_gives_no_fields_and_a_large_one_is_refused() -> None:
    form = asyncio.run(read_form(request_of(upload())))
    assert dict(form) == {} and form.files == {}  # no CSRF token: the guard refuses it
    with pytest.raises(HTTPException) as caught:
        asyncio.run(read_form(request_of(upload()), max_upload_bytes=64))
    assert caught.value.status_code == 413


def test_a_urlencoded_form_is_read_as_before() -> None:
    built = httpx.Request("POST", "http://console/x", data={"csrf": "t", "name": "a b"})
    form = asyncio.run(read_form(request_of(built)))
    assert dict(form) == {"csrf": "t", "name": "a b"} and form.files == {}
