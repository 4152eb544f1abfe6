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
import time
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
        self,
        app: ASGIApp | None,
        max_bytes: int,
        tracing: Callable[[], dict] | None = None,
        feedback: Any | None = None,
        router: Any | None = None,
    ):
        self.app, self.max_bytes, self.tracing, self.feedback = app, max_bytes, tracing, feedback
        self.router = router  # a Router: the request goes to the champion or the challenger (a canary)

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
        if self.router is not None:
            problem = await self.router(scope, bytes(body), receive, send)
            if problem:
                await self.refuse(send, problem, status=400)
            return
        assert self.app is not None
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
    behind the body cap those limits name; under `rlhf model serve` (RLHF_MODEL_NAME set), the champion and, during
    a canary, the challenger, re-read on a poll (service/arms.py), each request routed to one of them (Router)."""
    from mlflow.pyfunc import scoring_server

    from components.registry.policy_model import Limits

    if os.environ.get("RLHF_MODEL_NAME"):
        from service.arms import Arms

        arms = Arms.from_env()
        arms.start()
        champion, _ = arms.current()
        tracers = Tracers(arms)
        desk = feedback_desk(tracers) if champion.tracer is not None else None
        return BodyCap(None, champion.max_body_bytes, tracers.stats, desk, Router(arms, desk))
    model = scoring_server.load_model_with_mlflow_config(model_uri)
    limits = Limits.from_config({k: v for k, v in (model.model_config or {}).items() if k in Limits.names()})
    tracer = getattr(model.unwrap_python_model(), "tracer", None)  # a model logged before tracing has none
    desk = feedback_desk(tracer) if tracer is not None else None
    return BodyCap(scoring_server.init(model), limits.max_body_bytes, tracer.stats if tracer else None, desk)


def feedback_desk(tracer) -> Any | None:
    """`POST /feedback`'s desk (service/feedback_api.py) when the process knows its raters and keys, else None."""
    if not (os.environ.get("RLHF_RATERS_FILE") and os.environ.get("RLHF_SIGNING_KEYS")):
        return None
    from pathlib import Path

    from service.feedback_api import FeedbackDesk

    lo, _, hi = os.environ.get("RLHF_RATING_RANGE", "1:5").partition(":")
    return FeedbackDesk(
        tracer, Path(os.environ["RLHF_RATERS_FILE"]), Path(os.environ["RLHF_SIGNING_KEYS"]), (float(lo), float(hi))
    )


class Tracers:
    """The arms' tracers as one, for `POST /feedback` (an answer either arm returned) and `GET /tracing`."""

    def __init__(self, arms):
        self.arms = arms
        self.seen: list[Any] = []  # every tracer an arm ever had: an answer of a replaced arm can still be judged

    def _all(self) -> list[Any]:
        for arm in self.arms.current():
            if arm is not None and arm.tracer is not None and all(arm.tracer is not t for t in self.seen):
                self.seen.append(arm.tracer)
        return self.seen

    @property
    def experiment_id(self) -> str:
        return self._all()[0].experiment_id

    def served(self, trace_id: str) -> bool:
        return any(t.served(trace_id) for t in self._all())

    def stats(self) -> dict:
        tracers = self._all()
        if not tracers:
            return {"enabled": False}
        each = [t.stats() for t in tracers]
        traced = sum(e["traced"] for e in each)
        return {
            **each[0],
            "traced": traced,
            "dropped": sum(e["dropped"] for e in each),
            "build_ms_per_trace": sum(e["build_ms_per_trace"] * e["traced"] for e in each) / max(1, traced),
            "arms": {f"{t.arm} v{t.version}": e["traced"] for t, e in zip(tracers, each, strict=True)},
        }


class Router:
    """Sends an `/invocations` request to the champion or the challenger (components/registry/routing.py: sticky on
    the rater of a bearer token, else on `"user"` in the body or the X-User header, else random), adds `arm` and
    `version` to each prediction, and in shadow mode has the challenger answer the same body unseen."""

    def __init__(self, arms, desk=None):
        self.arms, self.desk = arms, desk
        self.background: set[Any] = set()

    def user_of(self, scope: Scope, body: bytes) -> tuple[str | None, bytes, str | None]:
        """-> (the routing key, the body MLflow gets, a one-sentence problem or None)."""
        from components.registry.routing import MAX_USER_CHARS

        headers = dict(scope.get("headers") or [])
        key = None
        scheme, _, token = headers.get(b"authorization", b"").decode(errors="replace").partition(" ")
        if scheme.lower() == "bearer" and token.strip() and self.desk is not None:
            rater = self.desk.raters.rater(token.strip())
            key = f"rater:{rater}" if rater else None
        try:
            doc = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            doc = None
        if isinstance(doc, dict) and "user" in doc:
            user = doc.pop("user")
            if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_CHARS:
                return None, body, f"user must be the app's end-user id, a string of 1..{MAX_USER_CHARS} characters."
            body = json.dumps(doc).encode()
            key = key or f"user:{user}"
        header = headers.get(b"x-user", b"").decode(errors="replace")
        if key is None and 0 < len(header) <= MAX_USER_CHARS:
            key = f"user:{header}"
        return key, body, None

    async def __call__(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> str | None:
        import asyncio

        from components.registry.routing import CHALLENGER, arm

        champion, challenger = self.arms.current()  # this request's arms, whatever a poll changes meanwhile
        invocation = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/invocations"
        chosen = champion
        if invocation:
            key, body, problem = self.user_of(scope, body)
            if problem:
                return problem
            if challenger is not None and challenger.name != "shadow":
                if arm(key, self.arms.share, f"v{challenger.version}") == CHALLENGER:
                    chosen = challenger
        started = time.time_ns()

        def done(arm):
            return lambda status, payload: failure(arm, body, status, payload, started)

        await call(chosen.app, scope, body, labelled(send, chosen, done(chosen)) if invocation else send, receive)
        if invocation and challenger is not None and challenger.name == "shadow":
            task = asyncio.create_task(
                call(challenger.app, scope, body, labelled(discard, challenger, done(challenger)))
            )
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        return None


async def call(app: ASGIApp, scope: Scope, body: bytes, send: Send, receive: Receive | None = None) -> None:
    """Run an ASGI app on a body read already; after it, `receive` (the client's: a disconnect) or nothing."""
    import asyncio

    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            if receive is not None:
                return await receive()
            await asyncio.Event().wait()  # a shadow call has no client: nothing more ever comes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    await app(scope, replay, send)


async def discard(message: Message) -> None:
    return None


def failed(status: int, payload: bytes) -> bool:
    """Whether an answer of the scoring app is the model failing a valid request: a 5xx, or MLflow's generic 400 for
    an unexpected exception in predict (it carries a stack trace). A request the model refused as invalid
    (INVALID_PARAMETER_VALUE, one sentence) or a malformed body is the client's, not a failure."""
    if status >= 500:
        return True
    if status != 400:
        return False
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "stack_trace" in doc and doc.get("error_code") != "INVALID_PARAMETER_VALUE"


def failure(arm, body: bytes, status: int, payload: bytes, started_ns: int) -> None:
    """A failed answer as a signed trace of its arm (the canary's error-rate guardrail counts it: components/registry/
    canary.served): the first prompt, an empty response, `error` in its outputs. Never raises into a request."""
    tracer = arm.tracer
    if not failed(status, payload) or tracer is None or getattr(tracer, "key", None) is None:
        return
    try:
        import mlflow

        from components.registry.policy_model import ANSWER, SIGNATURE, VERSION, answer_fields

        try:
            doc = json.loads(body)
            inputs = doc.get("inputs") or doc.get("instances") or []
            prompt = inputs[0] if isinstance(inputs, list) and inputs and isinstance(inputs[0], str) else ""
        except (ValueError, AttributeError, TypeError):
            prompt = ""
        params = {"error": status}
        span = mlflow.start_span_no_context(
            "answer",
            span_type="LLM",
            inputs={"prompt": prompt, "params": params},
            attributes={
                "latency_ms": (time.time_ns() - started_ns) / 1e6,
                VERSION: tracer.version,
                "rlhf.arm": arm.name,
            },
            tags={
                "rlhf.model": tracer.model,
                "rlhf.version": tracer.version,
                "rlhf.arm": arm.name,
                "rlhf.error": str(status),
            },
            experiment_id=tracer.experiment_id,
            start_time_ns=started_ns,
        )
        if signed := tracer.key.sign(ANSWER, answer_fields(span.trace_id, prompt, "", tracer.version, params)):
            span.set_attribute(SIGNATURE, signed)
        span.end(outputs={"response": "", "error": status})
    except Exception as e:  # tracing never fails a request
        tracer.dropped_one(f"failure trace: {type(e).__name__}: {e}")


def labelled(send: Send, arm, on_done: Callable[[int, bytes], None] | None = None) -> Send:
    """`send`, with `arm` and `version` added to each prediction of a JSON answer of 200; `on_done(status, body)`
    sees the app's answer first."""
    start: Message | None = None
    chunks = bytearray()

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        chunks.extend(message.get("body", b""))
        if message.get("more_body"):
            return
        payload = bytes(chunks)
        if on_done is not None:
            on_done(int(start.get("status", 500)), payload)
        if start.get("status") == 200:
            try:
                doc = json.loads(payload)
                for row in doc.get("predictions", []):
                    if isinstance(row, dict):
                        row.update(arm=arm.name, version=arm.version)
                payload = json.dumps(doc).encode()
            except (ValueError, AttributeError, TypeError):
                pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    return wrapped


def __getattr__(name: str) -> Any:  # `uvicorn service.serving:app` builds the app on first access only
    if name == "app":
        from mlflow.pyfunc import scoring_server

        globals()["app"] = application = build(os.environ[scoring_server._SERVER_MODEL_PATH])
        return application
    raise AttributeError(name)
