"""Served answers and raters' votes as the serving process makes them, without a server: the real Tracer of
components/registry/policy_model.py signs each answer's trace, the real FeedbackDesk of service/feedback_api.py
authenticates a rater's token and writes the signed assessment. Shared by the trust tests and the scheduled-ingest
test (tests/flows/test_serve.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pandas as pd

from components import tracking
from components.config import Config
from components.registry.policy_model import Tracer
from service import keys, raters
from service.feedback_api import FeedbackDesk


@dataclass
class Desk:
    tracer: Tracer
    desk: FeedbackDesk
    tokens: dict[str, str]

    def answer(self, prompts: list[str], responses: list[str]) -> list[str]:
        """One signed trace per prompt, as a served request records it: -> trace ids."""
        out = pd.DataFrame({"response": responses})
        p = {"max_new_tokens": 24, "temperature": 0.7, "top_p": 0.9, "seed": 0, "n": 1}
        return self.tracer.record(prompts, p, [[r] for r in responses], None, out, time.time_ns())

    def vote(self, rater: str, trace_id: str, up, rating=None, token: str | None = None):
        body = {"trace_id": trace_id, "value": up, **({"rating": rating} if rating is not None else {})}
        return self.desk.handle(f"Bearer {token or self.tokens[rater]}", json.dumps(body).encode())


def serving_desk(cfg: Config, rater_names: list[str], version: str = "1") -> Desk:
    """A tracer and a feedback desk on `cfg`'s tracking store and keyring, with a token per rater."""
    experiment_id = tracking.serving_experiment(cfg)
    ring = keys.load(cfg)
    path = raters.raters_path(cfg)
    tokens = {name: raters.add(path, name) for name in rater_names}
    tracer = Tracer(experiment_id, f"{cfg.tracking.registered_model_name}/{version}@champion", str(ring.path))
    desk = FeedbackDesk(tracer, path, ring.path, (cfg.data.min_rating, cfg.data.max_rating))
    return Desk(tracer, desk, tokens)
