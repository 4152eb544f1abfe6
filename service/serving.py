"""The served model's web app, as `rlhf model serve` runs it: MLflow's own scoring server
(`mlflow.pyfunc.scoring_server.init`, what `mlflow models serve` runs) behind a cap on the request body.

    uvicorn service.serving:app        # with __pyfunc_model_path__=models:/NAME@ALIAS (rlhf model serve sets it)

MLflow's server reads the whole body and parses it before the model sees a prompt, so a 20 MB request would be
held, parsed and handed over whole. `BodyCap` reads at most `max_body_bytes` (the served model's serving limit,
components/registry/policy_model.Limits) and answers 413 in one sentence past it, declared or streamed. A JSON body
that is not an object with one of MLflow's input fields gets a 400 in one sentence (MLflow's own answer has several,
and a stack trace for some). What passes is replayed to MLflow's app unchanged. The model's own checks (characters before tokens) follow.

`POST /feedback` takes a rater's judgement of an answer (service/feedback_api.py: bearer token, signed assessment).
`GET /tracing` answers the served model's tracing counts: {"enabled", "experiment_id", "traced", "dropped",
"build_ms_per_trace"} (components/registry/policy_model.Tracer), or {"enabled": false}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyCap:
    """Pure ASGI middleware: an HTTP request body over `max_bytes` gets a 413 before the app sees any of it."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, tracing: Callable[[], dict] | None = None, feedback: Any | None = None
    ):
        self.app, self.max_bytes, self.tracing, self.feedback = app, max_bytes, tracing, feedback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "GET" and scope.get("path", "").rstrip("/") == "/tracing":
            await self.answer(send, 200, self.tracing() if self.tracing else {"enabled": False})
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self.refuse(send, f"declares {declared.decode(errors='replace')} bytes")
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self.refuse(send, f"sent more than {self.max_bytes} bytes")
                return
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/feedback":
            await self.judge(scope, bytes(body), send)
            return
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/invocations":
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"application/json")
            if content_type.split(b";")[0].strip() == b"application/json" and (problem := json_problem(bytes(body))):
                await self.refuse(send, problem, status=400)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the app then waits for the client's disconnect, as with any request
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def judge(self, scope: Scope, body: bytes, send: Send) -> None:
        """`POST /feedback` (service/feedback_api.py), off the event loop: it talks to the tracking server."""
        import asyncio

        if self.feedback is None:
            await self.answer(
                send,
                404,
                {
                    "error_code": "NOT_FOUND",
                    "message": "This server does not trace its answers (registry.trace_requests=false), so they "
                    "cannot be judged.",
                },
            )
            return
        authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode(errors="replace")
        result = await asyncio.to_thread(self.feedback.handle, authorization, body)
        await self.answer(send, result.status, result.doc)

    async def answer(self, send: Send, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def refuse(self, send: Send, what: str, status: int = 413) -> None:
        """One sentence, in MLflow's error shape: 413 for a body over the cap (and the connection closed, as the
        rest of the body is not read), 400 for a JSON body MLflow could not take (`what` is then the sentence)."""
        if status == 413:
            error = {
                "error_code": "REQUEST_LIMIT_EXCEEDED",
                "message": f"The request body {what}, allowed 1..{self.max_bytes} bytes (serving limit "
                "max_body_bytes): send fewer or shorter prompts.",
                "field": "body",
                "allowed": f"1..{self.max_bytes} bytes",
            }
        else:
            error = {"error_code": "MALFORMED_REQUEST", "message": what, "field": "body", "allowed": INPUT_FIELDS}
        payload = json.dumps(error).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 413:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


INPUT_FIELDS = "a JSON object with one of: inputs, instances, dataframe_records, dataframe_split"


def json_problem(body: bytes) -> str | None:
    """What is wrong with a JSON request body, in one sentence, or None: what MLflow's server says about it has
    several sentences (and a stack trace for some), so the shape is checked here first; the contents are the
    model's to check."""
    fields = {"inputs", "instances", "dataframe_records", "dataframe_split"}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return f"The request body is not valid JSON ({str(e).split(':')[0].lower()}): send {INPUT_FIELDS}."
    except RecursionError:  # e.g. 400 KB of `[`: the parser recurses once per level, a 500 without this
        return f"The request body nests JSON deeper than the server parses: send {INPUT_FIELDS}."
    if not isinstance(doc, dict):
        return f"The request body is a JSON {type(doc).__name__}, not an object: send {INPUT_FIELDS}."
    given = sorted(fields & doc.keys())
    if len(given) != 1:
        has = f"has {', '.join(given)}" if given else "has none of them"
        return f"The request body {has}: send {INPUT_FIELDS}."
    return None


def build(model_uri: str) -> BodyCap:
    """MLflow's scoring app for `model_uri` (its serving limits applied, MLFLOW_PYFUNC_INFERENCE_CONFIG included),
    behind the body cap those limits name."""
    from mlflow.pyfunc import scoring_server

    from components.registry.policy_model import Limits

    model = scoring_server.load_model_with_mlflow_config(model_uri)
    limits = Limits.from_config({k: v for k, v in (model.model_config or {}).items() if k in Limits.names()})
    tracer = getattr(model.unwrap_python_model(), "tracer", None)  # a model logged before tracing has none
    desk = None
    if tracer is not None and os.environ.get("RLHF_RATERS_FILE") and os.environ.get("RLHF_SIGNING_KEYS"):
        from pathlib import Path

        from service.feedback_api import FeedbackDesk

        lo, _, hi = os.environ.get("RLHF_RATING_RANGE", "1:5").partition(":")
        desk = FeedbackDesk(
            tracer, Path(os.environ["RLHF_RATERS_FILE"]), Path(os.environ["RLHF_SIGNING_KEYS"]), (float(lo), float(hi))
        )
    return BodyCap(scoring_server.init(model), limits.max_body_bytes, tracer.stats if tracer else None, desk)


def __getattr__(name: str) -> Any:  # `uvicorn service.serving:app` builds the app on first access only
    if name == "app":
        from mlflow.pyfunc import scoring_server

        globals()["app"] = application = build(os.environ[scoring_server._SERVER_MODEL_PATH])
        return application
    raise AttributeError(name)
