"""The ASGI guard answers 413 before Django reads an oversized upload body."""

import json

import pytest
from asgiref.testing import ApplicationCommunicator

from files_app.asgi import UploadSizeLimit
from files_app.services import MULTIPART_OVERHEAD_BYTES


class RecordingApp:
    """Stands in for Django: reads the body like Django's handler, then answers 200."""

    def __init__(self):
        self.body = b""
        self.called = False

    async def __call__(self, scope, receive, send):
        self.called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def scope(path="/api/v1/files", method="POST", headers=()):
    return {"type": "http", "method": method, "path": path, "headers": list(headers)}


async def responses(communicator):
    start = await communicator.receive_output(timeout=2)
    body = await communicator.receive_output(timeout=2)
    return start, body


@pytest.fixture
def small_limit(settings):
    settings.PANTHEON_MAX_UPLOAD_BYTES = 100
    return 100 + MULTIPART_OVERHEAD_BYTES


async def test_declared_length_over_the_limit_is_refused_unread(small_limit):
    app = RecordingApp()
    communicator = ApplicationCommunicator(
        UploadSizeLimit(app), scope(headers=[(b"content-length", str(small_limit + 1).encode())]))
    await communicator.send_input({"type": "http.request", "body": b"x", "more_body": True})
    start, body = await responses(communicator)
    assert start["status"] == 413
    assert json.loads(body["body"])["code"] == "file_too_large"
    assert not app.called


async def test_streamed_body_over_the_limit_is_cut_off(small_limit):
    app = RecordingApp()
    communicator = ApplicationCommunicator(UploadSizeLimit(app), scope())
    chunk = b"x" * 16384
    for _ in range(small_limit // len(chunk) + 2):
        await communicator.send_input({"type": "http.request", "body": chunk, "more_body": True})
    start, body = await responses(communicator)
    assert start["status"] == 413
    assert len(app.body) <= small_limit


@pytest.mark.parametrize(("path", "method"), [("/api/v1/files", "POST"), ("/api/v1/sessions", "POST"),
                                              ("/api/v1/files", "GET")])
async def test_other_requests_pass_through(small_limit, path, method):
    app = RecordingApp()
    communicator = ApplicationCommunicator(
        UploadSizeLimit(app), scope(path=path, method=method, headers=[(b"content-length", b"5")]))
    await communicator.send_input({"type": "http.request", "body": b"hello"})
    start, body = await responses(communicator)
    assert start["status"] == 200
    assert app.body == b"hello"
