"""The served policy: an MLflow pyfunc model defined by code (models-from-code).

Artifacts: `base` (the SFT weights, safetensors + tokenizer) and `adapter` (the PPO policy's LoRA
adapter, merged into the base at load). Loads with no network and no remote code. Deliberately
depends only on torch, transformers, peft and pandas, so the logged model serves anywhere.

Input: a DataFrame with a `prompt` column, or a list of prompt strings.
Output: a DataFrame with one `response` per prompt.
Params (per request): max_new_tokens, temperature (0 = greedy), top_p, seed (-1 = random).
"""
from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

DEFAULT_PARAMS = {"max_new_tokens": 48, "temperature": 0.7, "top_p": 0.9, "seed": -1}


def prompts_of(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column].tolist()]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return [str(x) for x in (value if isinstance(value, (list, tuple)) else [value])]
    if isinstance(model_input, str):
        return [model_input]
    return [str(x) for x in list(model_input)]


class PolicyModel(PythonModel):
    def load_context(self, context):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base, adapter = context.artifacts["base"], context.artifacts.get("adapter")
        self.tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, trust_remote_code=False)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # pd.DataFrame: MLflow does no type-hint validation (the signature, logged explicitly, governs), and
        # a plain list of strings (`inputs`) still arrives here, converted by the signature
        p = {**DEFAULT_PARAMS, **(params or {})}
        prompts = prompts_of(model_input)
        if int(p["seed"]) >= 0:
            torch.manual_seed(int(p["seed"]))
        batch = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = float(p["temperature"]) > 0
        out = self.model.generate(**batch, max_new_tokens=int(p["max_new_tokens"]), do_sample=sampling,
                                  temperature=float(p["temperature"]) if sampling else None,
                                  top_p=float(p["top_p"]) if sampling else None, top_k=0 if sampling else None,
                                  pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        texts = self.tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return pd.DataFrame({"response": [t.strip() for t in texts]})


mlflow.models.set_model(PolicyModel())
