"""The guide of guided RL (RLGF: Chang et al. 2023, "Learning to Generate Better Than Your LLM"): a black
box, text in, continuation out. `ppo.guide.model` names one of:

    reference                        the SFT model: the PPO policy's base with its adapters disabled, already
                                     in memory, so it costs no memory at all
    a local directory                transformers weights (safetensors), or a peft adapter on its base
    an MLflow model URI              models:/rlhf-policy@champion, runs:/<id>/model: our registered pyfunc
    http(s)://host:port/invocations  a served model (`rlhf model serve`, `mlflow models serve`)

`Guide.complete(contexts, max_new_tokens, seed)` -> one continuation per context, as stripped text. What a
continuation means in tokens is the caller's business (components/training/guided.py re-tokenises with the
policy's tokenizer), so a guide may use any tokenizer, any size, any host.

Sampling is seeded per call (`seed`) and never touches the caller's random streams.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from components.config import GuideConfig, ModelConfig
from components.models.generation import sample
from components.models.roles import REFERENCE, Roles

if TYPE_CHECKING:  # annotations only: these load lazily, where a guide needs them
    from mlflow.pyfunc import PyFuncModel
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_SEED = 2**32 - 1  # the served pyfunc's seed range (components/registry/policy_model.py)


class GuideError(RuntimeError):
    """The guide could not be loaded or did not answer."""


class Guide(Protocol):
    name: str

    def complete(self, contexts: list[str], max_new_tokens: int, seed: int) -> list[str]: ...


@dataclass
class ModelGuide:
    """A causal LM in this process: the reference role of PPO's shared model, or a model loaded from a dir."""

    name: str
    model: PreTrainedModel | PeftModel  # PeftModel: PPO's shared model (the reference role)
    tok: PreTrainedTokenizerBase
    cfg: GuideConfig
    max_prompt_tokens: int
    roles: Roles | None = None  # set: the reference role of these roles (adapters disabled while it writes)

    @torch.no_grad()
    def complete(self, contexts: list[str], max_new_tokens: int, seed: int) -> list[str]:
        if not contexts:
            return []
        with torch.random.fork_rng(devices=_cuda_devices(self.model)):
            torch.manual_seed(seed)
            if self.roles is not None:
                with self.roles.use(REFERENCE):
                    ro = self._sample(contexts, max_new_tokens)
            else:
                ro = self._sample(contexts, max_new_tokens)
        return ro.texts

    def _sample(self, contexts, max_new_tokens):
        return sample(
            self.model,
            self.tok,
            contexts,
            max_new_tokens,
            self.cfg.temperature,
            self.cfg.top_p,
            self.max_prompt_tokens,
        )


@dataclass
class PyfuncGuide:
    """A registered MLflow model (our pyfunc policy, or any pyfunc taking a `prompt` column and params
    max_new_tokens/temperature/top_p/seed and answering a `response` column)."""

    name: str
    model: PyFuncModel
    cfg: GuideConfig

    def complete(self, contexts: list[str], max_new_tokens: int, seed: int) -> list[str]:
        import pandas as pd

        out: list[str] = []
        for i, chunk in enumerate(_chunks(contexts, self.cfg.request_batch)):
            params = _params(self.cfg, max_new_tokens, seed + i)
            frame = self.model.predict(pd.DataFrame({"prompt": chunk}), params=params)
            out.extend(_responses(frame, len(chunk), self.name))
        return out


@dataclass
class HTTPGuide:
    """A served model's `/invocations` (MLflow's scoring protocol: dataframe_records in, predictions out)."""

    name: str
    url: str
    cfg: GuideConfig
    attempts: int = 3  # a refused connection or a 5xx is tried again (1 s, 2 s); a 4xx is not

    def complete(self, contexts: list[str], max_new_tokens: int, seed: int) -> list[str]:
        out: list[str] = []
        for i, chunk in enumerate(_chunks(contexts, self.cfg.request_batch)):
            body = {
                "dataframe_records": [{"prompt": c} for c in chunk],
                "params": _params(self.cfg, max_new_tokens, seed + i),
            }
            out.extend(_responses(self._post(body), len(chunk), self.name))
        return out

    def _post(self, body: dict) -> list:
        import requests

        from components.tracking import redact_url

        where = redact_url(self.url)  # errors reach logs and MLflow: never a credential in the URL
        for attempt in range(1, self.attempts + 1):
            try:
                r = requests.post(self.url, json=body, timeout=self.cfg.timeout_s)
            except requests.RequestException as e:
                if attempt == self.attempts:
                    raise GuideError(
                        f"the guide at {where} did not answer ({type(e).__name__}) after {attempt} tries. "
                        "Is it being served (`rlhf model serve`)? Check ppo.guide.model."
                    ) from None
            else:
                if r.status_code == 200:
                    try:
                        return r.json()["predictions"]
                    except (ValueError, KeyError, TypeError):
                        raise GuideError(
                            f"the guide at {where} answered 200 without MLflow's `predictions`: {r.text[:300]!r}. "
                            "Is it an MLflow scoring server's /invocations?"
                        ) from None
                if r.status_code < 500 or attempt == self.attempts:
                    raise GuideError(
                        f"the guide at {where} answered HTTP {r.status_code}: {r.text[:500]}. "
                        "A 400 names the request field it refused; lower ppo.guide.request_batch if it is `prompt`."
                    )
            time.sleep(attempt)
        raise AssertionError("unreachable")


def load_guide(cfg: GuideConfig, roles: Roles, model_cfg: ModelConfig, max_prompt_tokens: int) -> Guide | None:
    """The guide `cfg.model` names (None when guided RL is off). Raises GuideError when it cannot be loaded."""
    spec = cfg.model
    if spec is None:
        return None
    if spec == "reference":
        return ModelGuide("reference", roles.model, roles.tok, cfg, max_prompt_tokens, roles=roles)
    if spec.startswith(("http://", "https://")):
        from components.tracking import redact_url

        return HTTPGuide(redact_url(spec), spec, cfg)
    if ":/" in spec:  # models:/name@alias, runs:/id/path, ... : an MLflow model
        import mlflow

        try:
            model = mlflow.pyfunc.load_model(spec)
        except Exception as e:  # MlflowException, OSError: name the URI and what to check
            raise GuideError(
                f"ppo.guide.model={spec!r}: cannot load this MLflow model ({type(e).__name__}: {e}). "
                "Check the name and alias (`rlhf status`) and the tracking URI."
            ) from None
        return PyfuncGuide(spec, model, cfg)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise GuideError(
            f"ppo.guide.model={spec!r}: not `reference`, an http(s) URL, an MLflow model URI or a local model directory"
        )
    return _local_guide(path, cfg, model_cfg, max_prompt_tokens, next(roles.model.parameters()).device)


def _local_guide(path: Path, cfg: GuideConfig, model_cfg: ModelConfig, max_prompt_tokens: int, device) -> ModelGuide:
    from components.models.loading import load_causal_lm, load_tokenizer

    if (path / "adapter_config.json").exists():  # a peft adapter (a PPO policy dir): on the base it names
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        model = PeftModel.from_pretrained(load_causal_lm(base, model_cfg, device), str(path)).merge_and_unload()
        tok_dir = str(path) if (path / "tokenizer_config.json").exists() else base
    else:
        model, tok_dir = load_causal_lm(str(path), model_cfg, device), str(path)
    tok = load_tokenizer(tok_dir, model_cfg, padding_side="left")
    return ModelGuide(str(path), model.eval(), tok, cfg, max_prompt_tokens)


def _params(cfg: GuideConfig, max_new_tokens: int, seed: int) -> dict:
    return {
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "seed": int(seed % MAX_SEED),
    }


def _chunks(xs: list[str], n: int) -> list[list[str]]:
    return [xs[i : i + n] for i in range(0, len(xs), max(1, n))]


def _responses(predictions, n: int, name: str) -> list[str]:
    """The `response` of each prediction: a DataFrame, or the scoring server's list of records."""
    if hasattr(predictions, "to_dict"):
        predictions = predictions.to_dict(orient="records")
    try:
        texts = [str(p["response"] if isinstance(p, dict) else p).strip() for p in predictions]
    except (KeyError, TypeError):
        raise GuideError(f"the guide {name} answered without a `response` field: {str(predictions)[:300]}") from None
    if len(texts) != n:
        raise GuideError(f"the guide {name} answered {len(texts)} continuations for {n} contexts")
    return texts


def _cuda_devices(model) -> list[int]:
    device = next(model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []
