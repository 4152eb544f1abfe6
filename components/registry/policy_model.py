"""The served policy: an MLflow pyfunc model defined by code (models-from-code).

Artifacts: `base` (the SFT weights, safetensors + tokenizer), `adapter` (the policy's LoRA adapter) and,
when the model was logged with its reward model (`registry.include_reward_model`), `reward_adapter` and
`reward_head` (the reward model's LoRA adapter on the same SFT weights, and its scalar head with the reward
statistics). Without a reward model the policy adapter is merged into the base at load; with one, both stay
adapters on one copy of the base (as in PPO: components/models/roles.py). Loads with no network and no
remote code. Deliberately
depends only on torch, transformers, peft and pandas, so the logged model serves anywhere (which is
also why the request validation lives in this file: a models-from-code model carries only this file).

Input: a DataFrame with a `prompt` column, or a list of prompt strings.
Output: a DataFrame with one `response` per prompt and, with a reward model, its `score` (the reward model's
score in the units of its training responses' std, as the evaluation reports it).
Params (per request): max_new_tokens, temperature (0 = greedy), top_p, seed (-1 = random), n (best-of-n:
sample n responses per prompt, answer the one the reward model scores highest; 1 = plain sampling).

Tracing (`Tracer`): when the serving process names an experiment in RLHF_TRACE_EXPERIMENT_ID (`rlhf model serve` does,
unless `registry.trace_requests=false`), each answered prompt is an MLflow trace in that experiment: the prompt, the
params, the response, the n candidates with their scores, the model's name, version and alias (RLHF_SERVED_MODEL),
the arm that answered (champion or, in a canary, challenger: RLHF_SERVED_ARM) and the request's latency; the output gets a `trace_id` column, which `rlhf feedback` attaches a person's judgement
to. MLflow exports traces from a background queue, so a request never waits on the tracking server; building them
costs the request about 5 ms per prompt on a 2-core CPU (measured in tests/registry/test_registry.py; docs/service.md). A trace that cannot be built or sent is
dropped and counted (`Tracer.stats`, logged, and `GET /tracing` under `rlhf model serve`); the request succeeds.

Input contract (checked before any generation): a body of at most `max_body_bytes` (`rlhf model serve`), 1..`max_prompts`
prompts, each a non-blank string of at most `max_prompt_chars` characters (before tokenizing) and `max_prompt_tokens` tokens and at most the model's context less `max_new_tokens`; `max_new_tokens`
in 1..`max_new_tokens_cap` (and below the context); temperature in 0..2; 0 < top_p <= 1; seed in
-1..2**32-1; n in 1..`max_n` (and 1 for a model logged without its reward model). The caps are `Limits` (defaults below; `registry.log_and_register` writes them, with any
overrides, into the logged model's `model_config`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

DEFAULT_PARAMS = {"max_new_tokens": 48, "temperature": 0.7, "top_p": 0.9, "seed": -1, "n": 1}
MAX_TEMPERATURE = 2.0  # above it, sampling from these small models is noise
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Limits:
    """Per-request serving caps: the one place their defaults live. Logged, all of them, as the model's
    `model_config`; at serve time `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"max_prompts": 8}'` (or load_model's
    model_config) overrides the caps the logged model names."""

    max_new_tokens_cap: int = 256  # also held below the model's context (one prompt token must fit)
    max_prompt_tokens: int = 1024  # also held to the model's context less the request's max_new_tokens
    max_prompts: int = 16
    max_n: int = 8  # best-of-n: responses sampled per prompt (a request generates up to max_prompts * max_n)
    # checked before tokenizing: a longer prompt is never tokenized or padded. The data contract's data.max_prompt_chars
    # (2000): `rlhf run` registers with it, so a served answer's prompt fits the feedback data it may become
    max_prompt_chars: int = 2000
    # the request body, checked before MLflow's server parses it (`rlhf model serve`: service/serving.py); room for
    # max_prompts prompts of max_prompt_chars characters of up to 4 UTF-8 bytes each
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serving limit {f.name} must be a positive integer, got {value!r}")
        if self.max_new_tokens_cap < DEFAULT_PARAMS["max_new_tokens"]:  # else a request with no params fails
            raise ValueError(
                f"serving limit max_new_tokens_cap must be at least the default max_new_tokens "
                f"{DEFAULT_PARAMS['max_new_tokens']}, got {self.max_new_tokens_cap}"
            )

    @classmethod
    def from_config(cls, config: dict | None) -> Limits:
        """Limits from a model_config (missing keys: defaults; unknown keys: ValueError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config or {}) - known)
        if unknown:
            raise ValueError(f"unknown serving limits {unknown}; known: {sorted(known)}")
        return cls(**(config or {}))

    def as_config(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


# A bad request raises MlflowException(error_code=INVALID_PARAMETER_VALUE): the supported way to get a clean
# 400 from `mlflow models serve`. Its scoring server (mlflow/pyfunc/scoring_server, `invocations`) re-raises
# an MlflowException from predict as it is, serialized with no `stack_trace`; any other exception becomes a
# generic 400 WITH the traceback. The server does prefix the message with "Failed to predict data
# '<the parsed input>'. \nError: ", so our one sentence ends the message, and the extra keys `field` and
# `allowed` (MlflowException's JSON kwargs) carry the same facts for clients to match on.
def bad_request(field: str, allowed: str, sentence: str) -> MlflowException:
    """A 400 for one field: `sentence` names the field and the allowed range."""
    return MlflowException.invalid_parameter_value(sentence, field=field, allowed=allowed)


def prompts_of(model_input) -> list:
    """The prompts of a request, as sent (not converted to str: validate_prompts checks their type)."""
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return model_input[column].tolist()
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


def check_range(field: str, value, low, high, note: str = "") -> None:
    """Raise a 400 unless low <= value <= high."""
    if not low <= value <= high:
        raise bad_request(field, f"{low}..{high}", f"{field} must be in {low}..{high}{note}, got {value!r}.")


def validate_params(p: dict, limits: Limits, context: int | None, has_reward_model: bool = False) -> None:
    """The generation params of a request (types were already enforced by the model's signature)."""
    cap = limits.max_new_tokens_cap if context is None else min(limits.max_new_tokens_cap, context - 1)
    check_range("max_new_tokens", p["max_new_tokens"], 1, cap)
    check_range("temperature", p["temperature"], 0.0, MAX_TEMPERATURE, " (0 = greedy)")
    if not 0.0 < p["top_p"] <= 1.0:
        raise bad_request("top_p", "(0, 1]", f"top_p must be in (0, 1], got {p['top_p']!r}.")
    check_range("seed", p["seed"], -1, MAX_SEED, " (-1 = random)")
    if has_reward_model:
        check_range("n", p["n"], 1, limits.max_n, " (best-of-n)")
    elif p["n"] != 1:
        raise bad_request(
            "n",
            "1..1",
            f"n must be in 1..1 for this model, got {p['n']!r}: it was registered without its reward model "
            "(registry.include_reward_model=false), so it cannot choose the best of n.",
        )


def validate_prompts(prompts: list, limits: Limits) -> None:
    """The number of prompts and each prompt's type (lengths need the tokenizer: see check_lengths)."""
    if not 1 <= len(prompts) <= limits.max_prompts:
        raise bad_request(
            "prompt",
            f"1..{limits.max_prompts}",
            f"prompt: a request holds 1..{limits.max_prompts} prompts, got {len(prompts)}.",
        )
    for i, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str) or not prompt.strip():
            shown = repr(prompt) if len(repr(prompt)) <= 40 else repr(prompt)[:40] + "..."
            raise bad_request("prompt", "non-blank string", f"prompt {i} must be a non-blank string, got {shown}.")
        if len(prompt) > limits.max_prompt_chars:
            raise bad_request(
                "prompt",
                f"1..{limits.max_prompt_chars} characters",
                f"prompt {i} has {len(prompt)} characters, allowed 1..{limits.max_prompt_chars} characters "
                f"(max_prompt_chars={limits.max_prompt_chars}).",
            )


def check_lengths(lengths: list[int], max_new_tokens: int, limits: Limits, context: int | None) -> None:
    """Each prompt fits max_prompt_tokens and, with max_new_tokens, the model's context."""
    cap = limits.max_prompt_tokens if context is None else min(limits.max_prompt_tokens, context - max_new_tokens)
    why = f"max_prompt_tokens={limits.max_prompt_tokens}" + (
        "" if context is None else f", and the {context}-token context less max_new_tokens={max_new_tokens}"
    )
    for i, n in enumerate(lengths, 1):
        if n > cap:
            raise bad_request(
                "prompt", f"1..{cap} tokens", f"prompt {i} has {n} tokens, allowed 1..{cap} tokens ({why})."
            )


@contextmanager
def seeded(seed: int, device: str):
    """Seed torch for this request only. transformers' generate takes no torch.Generator, so sampling
    draws from the global RNG: fork_rng restores its state afterwards, so a seeded request does not
    reseed the process for later requests. seed < 0: no seeding, the global RNG goes on as it is."""
    if seed < 0:
        yield
        return
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        yield


class PolicyModel(PythonModel):
    def load_context(self, context):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.limits = Limits.from_config(context.model_config)
        base, adapter = context.artifacts["base"], context.artifacts.get("adapter")
        self.tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Any: the base, or peft's model over it (the reward and policy adapters, or the policy merged in), and only
        # self.scorer tells generate() which: it calls the adapter methods where there are adapters
        self.scorer, self.shared_key = None, None
        self.reward_name, self.policy_name = "reward", "policy"
        # The scoring server runs predict in worker threads; one generation at a time keeps a seeded
        # request's draws from the global RNG its own (a shared base: one lock for every model on it).
        self.lock = threading.Lock()
        model: Any
        if "reward_adapter" in context.artifacts and os.environ.get("RLHF_SHARE_BASE") == "1":
            model = self._on_shared_base(base, adapter, context.artifacts["reward_adapter"])
            self.scorer = RewardScorer(
                model, context.artifacts["reward_head"], self.tok, self.device, adapter_name=self.reward_name
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, trust_remote_code=False)
            if "reward_adapter" in context.artifacts:  # policy and reward model as two adapters on one base
                model = PeftModel.from_pretrained(model, context.artifacts["reward_adapter"], adapter_name="reward")
                if adapter:
                    model.load_adapter(adapter, adapter_name="policy")
                self.scorer = RewardScorer(model, context.artifacts["reward_head"], self.tok, self.device)
            elif adapter:
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        self.context_tokens = getattr(model.config, "max_position_embeddings", None)
        self.has_policy_adapter = bool(adapter) and self.scorer is not None
        self.model = model.to(self.device).eval()
        self.tracer = Tracer.from_env()

    def _on_shared_base(self, base: str, adapter: str | None, reward_adapter: str):
        """RLHF_SHARE_BASE=1 (a canary's serving process: service/arms.py): the base weights are loaded once per
        process per content (sha256 of the weight files), and this model's reward and policy adapters are added to
        it under names of their own; every model on that base shares its lock. -> the shared peft model."""
        import sys
        import types
        import uuid
        from pathlib import Path

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        digest = hashlib.sha256()
        for f in sorted(Path(base).glob("*.safetensors")) + [Path(base) / "config.json"]:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
        # process-wide, whatever copy of this file a model loaded (each model carries its own: models-from-code)
        bases = sys.modules.setdefault("rlhf_shared_bases", types.ModuleType("rlhf_shared_bases"))
        shared = bases.__dict__.setdefault("by_digest", {})
        tag = uuid.uuid4().hex[:8]
        self.reward_name, self.policy_name = f"reward-{tag}", f"policy-{tag}"
        entry = shared.get(digest.hexdigest())
        if entry is None:
            model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, trust_remote_code=False)
            model = PeftModel.from_pretrained(model, reward_adapter, adapter_name=self.reward_name)
            entry = shared[digest.hexdigest()] = {"model": model, "lock": self.lock, "models": 0}
        else:
            entry["model"].load_adapter(reward_adapter, adapter_name=self.reward_name)
        if adapter:
            entry["model"].load_adapter(adapter, adapter_name=self.policy_name)
        entry["models"] += 1
        self.lock, self.shared_key = entry["lock"], digest.hexdigest()
        return entry["model"]

    def release(self) -> None:
        """Take this model's adapters off a shared base (service/arms.py, when its arm leaves traffic); the base goes
        with its last model. A model on a base of its own has nothing to release."""
        import sys

        if self.shared_key is None:
            return
        shared = sys.modules["rlhf_shared_bases"].__dict__["by_digest"]
        entry = shared.get(self.shared_key)
        if entry is None:
            return
        with self.lock:
            for name in (self.reward_name, self.policy_name):
                if name in entry["model"].peft_config:
                    entry["model"].delete_adapter(name)
            entry["models"] -= 1
            if entry["models"] <= 0:
                del shared[self.shared_key]
        self.shared_key = None

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # pd.DataFrame: MLflow does no type-hint validation (the signature, logged explicitly, governs), and
        # a plain list of strings (`inputs`) still arrives here, converted by the signature
        started = time.time_ns()
        p = {**DEFAULT_PARAMS, **(params or {})}
        prompts = prompts_of(model_input)
        validate_params(p, self.limits, self.context_tokens, has_reward_model=self.scorer is not None)
        validate_prompts(prompts, self.limits)
        texts, scores = self.candidates(prompts, p)
        if scores is None:
            out = pd.DataFrame({"response": [row[0] for row in texts]})
        else:
            best = [max(range(len(row)), key=row.__getitem__) for row in scores]  # the first of equal scores
            out = pd.DataFrame(
                {
                    "response": [t[i] for t, i in zip(texts, best, strict=True)],
                    "score": [s[i] for s, i in zip(scores, best, strict=True)],
                }
            )
        tracer = getattr(self, "tracer", None)  # None: not traced (and a model loaded without load_context)
        if tracer is not None:
            out["trace_id"] = tracer.record(prompts, p, texts, scores, out, started)
        return out

    def candidates(self, prompts: list[str], p: dict) -> tuple[list[list[str]], list[list[float]] | None]:
        """n sampled responses per prompt and, with a reward model, their scores: -> texts [P][n], scores [P][n]."""
        n = int(p["n"])
        batch = self.tok(
            [render_prompt(self.tok, q) for q in prompts], return_tensors="pt", padding=True, add_special_tokens=False
        )
        check_lengths(
            batch["attention_mask"].sum(dim=1).tolist(), int(p["max_new_tokens"]), self.limits, self.context_tokens
        )
        batch = {k: v.repeat_interleave(n, dim=0).to(self.device) for k, v in batch.items()}  # prompt i: rows i*n..
        with self.lock, seeded(int(p["seed"]), self.device):
            out = self.generate(batch, p)
            flat = [
                t.strip()
                for t in self.tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            ]
            scores = None if self.scorer is None else self.scorer.scores([q for q in prompts for _ in range(n)], flat)
        texts = [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
        return texts, None if scores is None else [scores[i * n : (i + 1) * n] for i in range(len(prompts))]

    def generate(self, batch, p: dict) -> torch.Tensor:
        """Token ids (prompt + continuation) for a padded batch, with the policy; temperature 0: greedy."""
        if self.scorer is None:
            return self._generate(batch, p)
        if self.has_policy_adapter:
            self.model.set_adapter(self.policy_name)
            return self._generate(batch, p)
        with self.model.disable_adapter():  # no policy adapter: the base (SFT) policy itself
            return self._generate(batch, p)

    def _generate(self, batch, p: dict) -> torch.Tensor:
        sampling = float(p["temperature"]) > 0
        return self.model.generate(
            **batch,
            max_new_tokens=int(p["max_new_tokens"]),
            do_sample=sampling,
            temperature=float(p["temperature"]) if sampling else None,
            top_p=float(p["top_p"]) if sampling else None,
            top_k=0 if sampling else None,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
        )


class _Drops(logging.Handler):
    """Counts the traces MLflow's exporter failed to send (its background queue logs a warning and drops them)."""

    def __init__(self, tracer: Tracer):
        super().__init__(logging.WARNING)
        self.tracer = tracer

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "trace" in message.lower():
            self.tracer.dropped_one(message)


class Tracer:
    """Each answered prompt as an MLflow trace (see the module docstring); never raises into a request."""

    EXPORT_LOGGERS = ("mlflow.tracing.export.mlflow_v3", "mlflow.tracing.export.async_export_queue")
    # How long MLflow's background export may keep one trace against an unreachable tracking server, and how many
    # it may hold. With MLflow's defaults (7 retries backing off 2 s .. 120 s, 120 s per attempt, 1000 queued), a
    # stopping server with 2 traces queued and the tracking server down took 496 s to exit: the exit flushes the
    # queue. With these, a trace that cannot be sent is dropped and counted after one retry 1 s later (5 s per
    # attempt at most), and at most 100 wait. Set in the serving process only (nothing else there talks to the
    # tracking server); an operator's own values win.
    EXPORT_LIMITS = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "100",
    }

    RECENT = 50_000  # trace ids of answers this process returned, remembered for `POST /feedback` (~5 MB)

    def __init__(self, experiment_id: str, served: str, keys_file: str | None = None):
        name, _, alias = served.partition("@")
        self.model, _, self.version = name.partition("/")
        self.experiment_id, self.alias = experiment_id, alias
        self.arm = os.environ.get("RLHF_SERVED_ARM", "champion")  # champion | challenger (a canary: service/arms.py)
        self.traced = self.dropped = 0
        self.build_ns = 0  # time spent building traces inside requests (the cost a request pays)
        self.count_lock = threading.Lock()
        self.log = logging.getLogger("rlhf.tracing")
        self.key = SigningKey(keys_file) if keys_file else None
        self.recent: OrderedDict[str, None] = OrderedDict()
        handler = _Drops(self)
        for name in self.EXPORT_LOGGERS:
            logging.getLogger(name).addHandler(handler)

    @classmethod
    def from_env(cls) -> Tracer | None:
        """The tracer `rlhf model serve` asks for (RLHF_TRACE_EXPERIMENT_ID, RLHF_SERVED_MODEL="name/version@alias",
        RLHF_SIGNING_KEYS: the keyring its answers are signed with), or None: no tracing."""
        experiment = os.environ.get("RLHF_TRACE_EXPERIMENT_ID")
        if not experiment:
            return None
        for key, value in cls.EXPORT_LIMITS.items():
            os.environ.setdefault(key, value)
        return cls(experiment, os.environ.get("RLHF_SERVED_MODEL", ""), os.environ.get("RLHF_SIGNING_KEYS"))

    def dropped_one(self, why: str) -> None:
        with self.count_lock:
            self.dropped += 1
            n = self.dropped
        self.log.warning("trace dropped (%d so far); the request was answered: %s", n, USERINFO.sub("//", why)[:300])

    def stats(self) -> dict:
        with self.count_lock:
            return {
                "enabled": True,
                "experiment_id": self.experiment_id,
                "traced": self.traced,
                "dropped": self.dropped,
                "signed": self.key is not None,
                "build_ms_per_trace": self.build_ns / 1e6 / max(1, self.traced),
            }

    def served(self, trace_id: str) -> bool:
        """Whether this process returned the answer `trace_id` (recently: the last RECENT)."""
        with self.count_lock:
            return trace_id in self.recent

    def record(self, prompts: list[str], p: dict, texts, scores, out: pd.DataFrame, started_ns: int) -> list[str]:
        """One trace per prompt: -> its trace id ("" where it could not be built)."""
        t0 = time.time_ns()
        latency_ms = (t0 - started_ns) / 1e6
        ids = []
        params = json.loads(json.dumps(p, default=str))  # as the trace stores them: what the signature covers
        for i, prompt in enumerate(prompts):
            try:
                ids.append(self._one(i, prompt, params, texts, scores, out, started_ns, t0, latency_ms))
            except Exception as e:  # tracing never fails a request
                self.dropped_one(f"{type(e).__name__}: {e}")
                ids.append("")
        with self.count_lock:
            self.build_ns += time.time_ns() - t0
        return ids

    def _one(self, i, prompt, p, texts, scores, out, started_ns, ended_ns, latency_ms) -> str:
        import mlflow

        candidates = [
            {"response": t, **({"score": scores[i][j]} if scores is not None else {})} for j, t in enumerate(texts[i])
        ]
        span = mlflow.start_span_no_context(
            "answer",
            span_type="LLM",
            inputs={"prompt": prompt, "params": p},
            attributes={"latency_ms": latency_ms, "n": int(p["n"]), VERSION: self.version, "rlhf.arm": self.arm},
            tags={
                "rlhf.model": self.model,
                "rlhf.version": self.version,
                "rlhf.alias": self.alias,
                "rlhf.arm": self.arm,
            },
            experiment_id=self.experiment_id,
            start_time_ns=started_ns,
        )
        row = out.iloc[i]
        response = {"response": row["response"], **({"score": float(row["score"])} if "score" in row else {})}
        if self.key is not None and (
            signed := self.key.sign(ANSWER, answer_fields(span.trace_id, prompt, str(row["response"]), self.version, p))
        ):
            span.set_attribute(SIGNATURE, signed)
        span.end(outputs={**response, "candidates": candidates}, end_time_ns=ended_ns)
        with self.count_lock:
            self.traced += 1
            self.recent[span.trace_id] = None
            if len(self.recent) > self.RECENT:
                self.recent.popitem(last=False)
        return span.trace_id


# ---- provenance: components/registry/provenance.py, repeated (a models-from-code model carries only this file; a
# test holds them equal)
ANSWER = "answer"
SIGNATURE = "rlhf.signature"  # the root span's attribute that carries an answer's signature
VERSION = "rlhf.version"  # the served version, also as a span attribute: trace tags can be changed through the API
USERINFO = re.compile(r"//[^/@\s]*@")


def canonical(purpose: str, fields: dict) -> bytes:
    text = json.dumps([purpose, fields], sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode("utf-8", "surrogatepass")


def answer_fields(trace_id: str, prompt: str, response: str, version: str, params) -> dict:
    return {"trace_id": trace_id, "prompt": prompt, "response": response, "version": version, "params": params}


class SigningKey:
    """The active key of the project's keyring file (service/keys.py), re-read when the file changes (a rotation
    takes effect without a restart). A keyring that cannot be read signs nothing: the answers are traced, unsigned,
    and the ingest leaves them out."""

    def __init__(self, path: str):
        self.path, self.kid, self.secret = path, "", b""
        self.stamp: tuple[int, int] | None = None
        self.lock = threading.Lock()

    def sign(self, purpose: str, fields: dict) -> str | None:
        with self.lock:
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) != self.stamp:
                    with open(self.path) as f:
                        doc = json.load(f)
                    key = next(k for k in doc["keys"] if k["kid"] == doc["active"])
                    self.kid, self.secret = key["kid"], bytes.fromhex(key["secret"])
                    self.stamp = (st.st_mtime_ns, st.st_size)
            except (OSError, ValueError, KeyError, StopIteration):
                return None
            kid, secret = self.kid, self.secret
        return f"{kid}:{hmac.new(secret, canonical(purpose, fields), hashlib.sha256).hexdigest()}"


def render_prompt(tok, prompt: str) -> str:
    """components.models.chat.render_prompt, repeated (the served file stands alone; a test holds them equal): with
    a chat template, the prompt as a user message with the assistant's turn opened; else the prompt itself."""
    if not getattr(tok, "chat_template", None):
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def prompt_and_response(tok, prompt: str, response: str) -> str:
    """components.models.chat.prompt_and_response, repeated."""
    return render_prompt(tok, prompt) + response if getattr(tok, "chat_template", None) else f"{prompt} {response}"


class RewardScorer:
    """The bundled reward model: adapter "reward" of the shared peft model + a linear head, scoring
    prompt + " " + response + EOS at its last token, normalised with the reward statistics of its training
    responses. The same computation as components.models.scoring.encode + roles.sequence_scores (a test holds
    them equal); repeated here because a models-from-code model carries only this file."""

    def __init__(self, model, head_dir: str, tok, device: str, adapter_name: str = "reward"):
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        meta = json.loads((Path(head_dir) / "head.json").read_text())
        weights = load_file(str(Path(head_dir) / "head.safetensors"))
        self.weight, self.bias = weights["linear.weight"].to(device), weights["linear.bias"].to(device)  # (1, H), (1,)
        self.mean, self.std, self.max_length = meta["reward_mean"], meta["reward_std"], meta["max_length"]
        self.model, self.tok, self.device, self.adapter_name = model, tok, device, adapter_name

    @torch.no_grad()
    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        ids = [
            # the last max_length - 1 tokens, as scoring.encode: a long prompt loses its start, never the response
            self.tok(prompt_and_response(self.tok, p, r), add_special_tokens=False)["input_ids"][
                -(self.max_length - 1) :
            ]
            + [self.tok.eos_token_id]
            for p, r in zip(prompts, responses, strict=True)
        ]
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):  # right padding: positions start at 0 on the first token
            input_ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        self.model.set_adapter(self.adapter_name)
        decoder = self.model.get_base_model().get_decoder()
        hidden = decoder(
            input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False
        ).last_hidden_state  # (B, T, H)
        last = hidden[torch.arange(len(ids), device=self.device), mask.sum(1) - 1]  # (B, H)
        raw = (last.float() @ self.weight.float().T).squeeze(-1) + self.bias.float()  # (B,): fp32, as ScalarHead
        return ((raw - self.mean) / self.std).tolist()


mlflow.models.set_model(PolicyModel())
