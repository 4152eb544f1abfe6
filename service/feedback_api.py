"""`POST /feedback` of the served app (service/serving.py): a rater's judgement of an answer, written by the app.

    POST /feedback  Authorization: Bearer <a rater's token>   {"trace_id": "tr-...", "value": true, "rating": 4}

The rater is the caller the token names (service/raters.py), never a field of the body. The answer must be one this
process returned (it remembers the last Tracer.RECENT), or a trace in the project's experiment whose answer signature
verifies (another replica's, or from before a restart). The app writes MLflow's feedback assessment itself (name
`thumbs`, source HUMAN and the rater, the rating in its metadata) and signs it (components/registry/provenance.py,
purpose `vote`), so `rlhf ingest --from-traces` counts it. A vote on an answer just returned is taken at once: the
app first flushes its own trace export queue, so the trace is in the store before the assessment is.

Every refusal is one sentence with a status: 400 (the body), 401 (no token, or one no rater holds), 404 (not a
served answer of this project), 503 (the answer's trace was dropped, or the tracking server is unreachable).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.registry import provenance
from components.registry.feedback import AT_MS, FEEDBACK, SIGNATURE, BadFeedback, answer_status, check_rating_range
from service import keys as keyring
from service.raters import Directory

MAX_TRACE_ID = 64


class MlflowUsers:
    """The server profile's other way to name a rater: the caller's MLflow user (`Authorization: Basic`), checked by
    the tracking server itself (its users/get for that user, with those credentials), remembered for CACHE_S. Only
    when the tracking server is remote (http/https: `rlhf services up` gives it authentication)."""

    CACHE_S = 60.0

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri.rstrip("/")
        self.enabled = self.uri.startswith(("http://", "https://"))
        self.seen: dict[str, tuple[str, float]] = {}

    def user(self, credentials: str) -> str | None:
        import base64
        import hashlib
        import urllib.parse

        from service.credentials import http_status

        key = hashlib.sha256(credentials.encode()).hexdigest()
        if (hit := self.seen.get(key)) and time.monotonic() - hit[1] < self.CACHE_S:
            return hit[0]
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if not user or not password:
            return None
        url = f"{self.uri}/api/2.0/mlflow/users/get?username={urllib.parse.quote(user)}"
        if http_status(url, f"{user}:{password}", timeout=10) != 200:
            return None
        self.seen[key] = (user, time.monotonic())
        return user


@dataclass
class Answer:
    status: int
    doc: dict[str, Any]


def refuse(status: int, sentence: str, field: str | None = None) -> Answer:
    return Answer(
        status,
        {
            "error_code": {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 404: "NOT_FOUND"}.get(status, "UNAVAILABLE"),
            "message": sentence,
            **({"field": field} if field else {}),
        },
    )


class FeedbackDesk:
    """Takes judgements for the served model's answers (see the module docstring)."""

    def __init__(self, tracer, raters_file: Path, keys_file: Path, rating_range: tuple[float, float]):
        self.tracer, self.raters = tracer, Directory(raters_file)
        self.keys_file, self.rating_range = keys_file, rating_range
        self.mlflow_users = MlflowUsers(os.environ.get("MLFLOW_TRACKING_URI", ""))

    def handle(self, authorization: str | None, body: bytes) -> Answer:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "basic" and token.strip() and self.mlflow_users.enabled:
            rater = self.mlflow_users.user(token.strip())
            if rater is None:
                return refuse(
                    401, "The tracking server does not know these MLflow credentials: check the user and password."
                )
        elif scheme.lower() != "bearer" or not token.strip():
            return refuse(
                401,
                "POST /feedback needs `Authorization: Bearer TOKEN` with a rater's token (the operator gives one with "
                "`rlhf raters add NAME`), or, in the server profile, the rater's MLflow user and password (Basic).",
            )
        else:
            rater = self.raters.rater(token.strip())
        if rater is None:
            return refuse(401, "The bearer token is no rater's (unknown or revoked): ask the operator for a token.")
        try:
            trace_id, up, rating = self.parse(body)
        except BadFeedback as e:
            return refuse(400, str(e), "body")
        import mlflow

        if not self.tracer.served(trace_id):
            if (problem := self.stored_answer_problem(trace_id)) is not None:
                return refuse(*problem, "trace_id")
        else:
            mlflow.flush_trace_async_logging()  # the answer's trace reaches the store before its assessment does
        ring = keyring.read(self.keys_file)
        at_ms = int(time.time() * 1000)
        kid, secret = ring.signer()
        signature = provenance.sign(
            kid, secret, provenance.VOTE, provenance.vote_fields(trace_id, rater, up, rating, at_ms)
        )
        from mlflow.entities import AssessmentSource, AssessmentSourceType

        metadata = {SIGNATURE: signature, AT_MS: str(at_ms), **({"rating": repr(rating)} if rating is not None else {})}
        try:
            assessment = mlflow.log_feedback(
                trace_id=trace_id,
                name=FEEDBACK,
                value=up,
                source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=rater),
                metadata=metadata,
            )
        except Exception as e:  # the store refused it: the trace was dropped, or the server is down
            return refuse(
                503,
                f"The judgement could not be recorded ({type(e).__name__}): the answer's trace may have been dropped "
                "(GET /tracing counts drops) or the tracking server is unreachable; try again later.",
            )
        return Answer(
            200,
            {
                "trace_id": trace_id,
                "rater": rater,
                "value": up,
                "rating": rating,
                "assessment_id": assessment.assessment_id,
            },
        )

    def parse(self, body: bytes) -> tuple[str, bool, float | None]:
        """The body's trace_id, value (a JSON boolean) and rating (a number, or absent/null), strictly."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadFeedback(
                'The body is not JSON: send {"trace_id": "...", "value": true|false, "rating": N}.'
            ) from None
        if not isinstance(doc, dict):
            raise BadFeedback('The body must be a JSON object: {"trace_id": "...", "value": true|false}.')
        extra = sorted(set(doc) - {"trace_id", "value", "rating"})
        if extra:
            raise BadFeedback(f"Unknown field(s) {', '.join(extra)}: send only trace_id, value and rating.")
        trace_id, up, rating = doc.get("trace_id"), doc.get("value"), doc.get("rating")
        if not isinstance(trace_id, str) or not 0 < len(trace_id) <= MAX_TRACE_ID:
            raise BadFeedback(
                f"trace_id must be the trace_id string of a served answer (1..{MAX_TRACE_ID} characters)."
            )
        if not isinstance(up, bool):
            raise BadFeedback(f"value must be true (thumbs up) or false (thumbs down), got {json.dumps(up)[:40]}.")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, (int, float))):
            raise BadFeedback(f"rating must be a number or absent, got {json.dumps(rating)[:40]}.")
        rating = None if rating is None else float(rating)
        check_rating_range(up, rating, *self.rating_range)
        return trace_id, up, rating

    def stored_answer_problem(self, trace_id: str) -> tuple[int, str] | None:
        """None when `trace_id` is a signed answer in the project's experiment (served by another process), else the
        status and why not, in one sentence."""
        import mlflow

        not_ours = (
            f"trace {trace_id!r} is not an answer this project served: send the trace_id of a response of "
            "`rlhf model serve`."
        )
        from mlflow.exceptions import MlflowException

        try:
            trace = mlflow.MlflowClient().get_trace(trace_id)
        except MlflowException as e:  # not found, or a malformed id: MLflow's own answer, so the store was reached
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "BAD_REQUEST"):
                return 404, not_ours
            return 503, (
                f"The answer could not be looked up ({e.error_code}): the tracking server is unreachable or failing; "
                "try again later."
            )
        except Exception as e:
            return 503, (
                f"The answer could not be looked up ({type(e).__name__}): the tracking server is unreachable or "
                "failing; try again later."
            )
        if trace is None or trace.info.experiment_id != self.tracer.experiment_id:
            return 404, not_ours
        keys = keyring.read(self.keys_file).verifying()
        return None if answer_status(trace, keys) == provenance.OK else (404, not_ours)
