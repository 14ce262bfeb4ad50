"""The endpoints' guard as plain ASGI (no Ray): the API key, and the body limit counted on the
bytes received, so a chunked request with no Content-Length is refused too."""

import asyncio
import json

from rankformer.serve.core import Guard

KEY = "s3cret"


def _call(
    guard: Guard, chunks: list[bytes], headers: dict[str, str], path: str = "/v1/embed"
) -> tuple[int, bytes]:
    """Send a request of ``chunks`` (one http.request message each) through ``guard``; returns
    the response status and body."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _echo_app() -> tuple[Guard, list[bytes]]:
    seen: list[bytes] = []

    async def app(scope: dict, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return Guard(app, lambda: KEY, max_body_bytes=100), seen


def test_a_chunked_body_over_the_limit_is_refused_without_a_length():
    guard, seen = _echo_app()
    status, body = _call(guard, [b"x" * 60, b"y" * 60], {"x-api-key": KEY})
    assert status == 413 and "over the limit of 100 bytes" in json.loads(body)["detail"]
    assert seen == []  # the app never saw it


def test_a_body_within_the_limit_reaches_the_app_whole():
    guard, seen = _echo_app()
    status, body = _call(guard, [b"a" * 40, b"b" * 40, b"c" * 20], {"x-api-key": KEY})
    assert status == 200 and body == b"a" * 40 + b"b" * 40 + b"c" * 20 and seen == [body]


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    guard, seen = _echo_app()
    status, _ = _call(guard, [b"z"], {"x-api-key": KEY, "content-length": "5000"})
    assert status == 413 and seen == []


def test_the_api_key_is_required_on_the_v1_paths_only():
    guard, _ = _echo_app()
    assert _call(guard, [b"{}"], {})[0] == 401
    assert _call(guard, [b"{}"], {"x-api-key": "s3cre"})[0] == 401  # a prefix of the key
    assert _call(guard, [b"{}"], {"x-api-key": KEY + "x"})[0] == 401
    assert _call(guard, [b"{}"], {}, path="/healthz")[0] == 200
    assert _call(guard, [b"{}"], {"x-api-key": KEY})[0] == 200
