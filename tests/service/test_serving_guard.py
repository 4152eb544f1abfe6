"""Issue 38: the serving guard (service/serving.py, `BodyCap` and `json_problem`) answers a JSON body nested too deep
for the parser with a 400 in one sentence, not the parser's RecursionError as a 500; in-process, no server."""

import asyncio
import json

from service.serving import INPUT_FIELDS, BodyCap, json_problem

DEEP = b"[" * 400_000  # ~400 KB: under a 1 MB cap, far deeper than json.loads recurses


def post(body: bytes, max_bytes: int = 1_000_000) -> tuple[int, dict, bool]:
    """POST /invocations through BodyCap in front of an app that answers 200: -> (status, JSON body, app reached)."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    asyncio.run(BodyCap(app, max_bytes)(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"]), bool(reached)


def test_a_body_nested_too_deep_gets_a_400_in_one_sentence():
    for body in (DEEP, b'{"inputs": ' + DEEP):
        status, answer, reached = post(body)
        assert status == 400 and not reached, answer
        assert answer["error_code"] == "MALFORMED_REQUEST" and answer["field"] == "body"
        assert answer["message"] == f"The request body nests JSON deeper than the server parses: send {INPUT_FIELDS}."
    assert post(b'{"inputs": [["The film was"]]}') == (200, {}, True), "a nested body within reach passes"
    assert json_problem(b"[" * 50 + b"]" * 50).startswith("The request body is a JSON list")
