"""Provenance of what reaches the training data from serving: HMAC-SHA256 signatures with a key id. Pure.

The serving process signs each answer it traces (purpose `answer`: trace id, prompt, response, model version,
params) and each judgement it records (`vote`: trace id, rater, value, rating, when), with the project's active
signing key (service/keys.py); the ingest counts only what verifies against a key that is not retired. A stage
request from the orchestrator to a worker is signed the same way (`stage-request`). Whoever can write to the MLflow
experiment or call the Prefect API but does not hold a key can write traces, assessments and parameters, but not
ones that verify.

A signature is `<key id>:<hex digest>` over the purpose and the fields as canonical JSON (sorted keys, no spaces,
UTF-8), so the same fields always give the same bytes, and a signature for one purpose never verifies for another.
components/registry/policy_model.py repeats `canonical` and `sign` (a models-from-code model carries one file);
tests/registry/test_provenance.py holds them equal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

ANSWER = "answer"
VOTE = "vote"
STAGE_REQUEST = "stage-request"
STAGE_RESULT = "stage-result"  # a worker's record of what a stage produced, bound to the request and its flow run

OK = "ok"
UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown or retired key"
BAD = "bad signature"


SHAPE = re.compile(r"^[A-Za-z0-9_-]{1,64}:[0-9a-f]{64}$")


def canonical(purpose: str, fields: dict[str, Any]) -> bytes:
    """The bytes a signature covers: `purpose` and `fields` as one canonical JSON document (a lone surrogate in a
    stored text encodes as itself: never an error, so a stored text cannot stop a harvest)."""
    text = json.dumps([purpose, fields], sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode("utf-8", "surrogatepass")


def sign(kid: str, secret: bytes, purpose: str, fields: dict[str, Any]) -> str:
    """The signature of `fields` for `purpose` with key `kid`: `kid:` + HMAC-SHA256(secret, canonical(...)) in hex."""
    return f"{kid}:{hmac.new(secret, canonical(purpose, fields), hashlib.sha256).hexdigest()}"


def verify(keys: dict[str, bytes], purpose: str, fields: dict[str, Any], signature: Any) -> str:
    """OK, or why not: UNSIGNED (no signature), UNKNOWN_KEY (a key id not among `keys`, which holds the keys not
    retired), BAD (it does not match: forged, or the fields changed). Constant-time comparison."""
    if not isinstance(signature, str) or not signature:
        return UNSIGNED
    if not SHAPE.match(signature):
        return BAD
    kid = signature.partition(":")[0]
    secret = keys.get(kid)
    if secret is None:
        return UNKNOWN_KEY
    try:
        expected = sign(kid, secret, purpose, fields)
    except (TypeError, ValueError):  # fields that are not JSON: not what was signed
        return BAD
    return OK if hmac.compare_digest(expected.encode(), signature.encode()) else BAD


def answer_fields(trace_id: str, prompt: str, response: str, version: str, params: Any) -> dict[str, Any]:
    """What an answer's signature covers."""
    return {"trace_id": trace_id, "prompt": prompt, "response": response, "version": version, "params": params}


def vote_fields(trace_id: str, rater: str, value: Any, rating: Any, at_ms: Any) -> dict[str, Any]:
    """What a judgement's signature covers: the answer it judges, who, what, and when (the latest vote wins)."""
    return {"trace_id": trace_id, "rater": rater, "value": value, "rating": rating, "at_ms": at_ms}
