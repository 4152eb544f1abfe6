"""DPO and KTO (components/training/direct.py): the losses by hand; the data each needs, refused in one sentence; on
the demo the policy's held-out reward rises over SFT's with the KL small, only its LoRA adapter trains against the SFT
model as the reference, dropout is off in both, the outputs take PPO's layout, and a run killed and resumed ends where
an uninterrupted one does."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import DPOConfig, KTOConfig, ModelConfig, PPOConfig
from components.models.roles import REFERENCE
from components.models.scoring import logprobs_of
from components.training import checkpoint, direct, policy_run
from components.training.direct import (
    check_config,
    data_problem,
    encode_responses,
    eval_batches,
    logratios,
    planned_steps,
    train_direct,
)
from components.training.direct_math import dpo_pair_losses, kto_losses, kto_reference_point, weighted_mean
from components.training.ppo import policy_logits


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log(1 + math.exp(x))


# ---- the losses, by hand
def test_dpo_losses_by_hand():
    """Log-ratios chosen (1, 0), rejected (0, 0.5), beta 0.5: beta d = (0.5, -0.25)."""
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    sigmoid = dpo_pair_losses(c, r, 0.5, "sigmoid")
    assert sigmoid.tolist() == pytest.approx([softplus(-0.5), softplus(0.25)], abs=1e-6)  # 0.4741, 0.8259
    assert dpo_pair_losses(c, r, 0.5, "hinge").tolist() == pytest.approx([0.5, 1.25])
    # ipo: per-token log-ratios (chosen 2 and 4 tokens, rejected 1 and 5): 1/2 - 0/1 = 0.5, 0/4 - 0.5/5 = -0.1;
    # minus 1/(2 beta) = 1, squared: 0.25, 1.21
    ipo = dpo_pair_losses(
        c, r, 0.5, "ipo", chosen_tokens=torch.tensor([2.0, 4.0]), rejected_tokens=torch.tensor([1.0, 5.0])
    )
    assert ipo.tolist() == pytest.approx([0.25, 1.21])
    # robust, e = 0.1: (0.9 * softplus(-0.5) - 0.1 * softplus(0.5)) / 0.8 = (0.42667 - 0.09741) / 0.8 = 0.41158
    robust = dpo_pair_losses(c, r, 0.5, "robust", label_smoothing=0.1)
    assert robust[0].item() == pytest.approx((0.9 * softplus(-0.5) - 0.1 * softplus(0.5)) / 0.8, abs=1e-6)
    assert robust[0].item() == pytest.approx(0.41158, abs=1e-5)
    assert torch.allclose(dpo_pair_losses(c, r, 0.5, "robust", label_smoothing=0.0), sigmoid)
    with pytest.raises(ValueError, match="ipo loss needs each response's token count"):
        dpo_pair_losses(c, r, 0.5, "ipo")


def test_a_rankings_pairs_weigh_as_one_example():
    """A ranking of 3 (its 3 pairs at 1/3) and one pairwise example (weight 1): the ranking's mean loss and the
    pair's, averaged: ((1 + 2 + 3) / 3 + 6) / 2 = 4."""
    losses, weights = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert weighted_mean(losses, weights).item() == pytest.approx(4.0)


def test_kto_loss_by_hand():
    """Log-ratios (1, -1, 0.5), thumbs (up, down, down), mismatched log-ratios (0.2, -0.4, 0.8): z = 0.2. beta 1:
    up 1 - s(1 - 0.2) = 0.31003; down 1 - s(0.2 + 1) = 0.23148; down 1 - s(0.2 - 0.5) = 0.57444."""
    z = kto_reference_point(torch.tensor([0.2, -0.4, 0.8]))
    assert z.item() == pytest.approx(0.2)
    assert kto_reference_point(torch.tensor([-1.0, -2.0])).item() == 0.0, "z is at least 0"
    ratio, up = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([True, False, False])
    assert kto_losses(ratio, up, z, 1.0).tolist() == pytest.approx([0.31003, 0.23148, 0.57444], abs=1e-5)
    weighted = kto_losses(ratio, up, z, 1.0, desirable_weight=1.0, undesirable_weight=2.0)
    assert weighted.tolist() == pytest.approx([0.31003, 0.46295, 1.14889], abs=1e-5)
    # z is the baseline, not a target: the loss's gradient reaches the rows' log-ratios and never the mismatched pairs'
    ratio, mismatched = (
        torch.tensor([1.0, -1.0, 0.5], requires_grad=True),
        torch.tensor([0.2, -0.4, 0.8], requires_grad=True),
    )
    z = kto_reference_point(mismatched)
    kto_losses(ratio, up, z, 1.0).sum().backward()
    assert not z.requires_grad and mismatched.grad is None
    assert ratio.grad is not None and (ratio.grad != 0).all()


# ---- what each needs, refused in one sentence
def test_each_method_needs_its_data_kind_and_names_the_other():
    only_pairs = {"preferences_pairwise": 80, "preferences_ranked": 20, "feedback": 0}
    assert data_problem("dpo", only_pairs) is None
    message = data_problem("kto", only_pairs)
    assert message == (
        "policy=kto trains on thumbs up/down (data/feedback/) and this data version has 0 such rows: ingest some with "
        "`rlhf ingest FILE --kind feedback`, or use policy=dpo, which trains on the 100 rows it has"
    )
    only_thumbs = {"feedback": 300}
    assert data_problem("kto", only_thumbs) is None
    assert "or use policy=kto, which trains on the 300 rows it has" in data_problem("dpo", only_thumbs)
    assert data_problem("ppo", {}) is None and "or use" not in data_problem("dpo", {})


def test_small_data_caps_the_steps_at_max_epochs_passes():
    assert planned_steps(DPOConfig(steps=200, max_epochs=10, batch_size=16), 90) == 57  # ceil(10 * 90 / 16)
    assert planned_steps(DPOConfig(steps=200, max_epochs=10, batch_size=16), 1800) == 200
    assert planned_steps(KTOConfig(steps=200, max_epochs=0.01, batch_size=16), 10) == 1


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"policy.dpo.loss_type must be one of sigmoid, ipo, hinge, robust, got 'x'"):
        check_config("dpo", DPOConfig(loss_type="x"))
    with pytest.raises(ValueError, match=r"policy.dpo.label_smoothing must be in \[0, 0.5\), got 0.5"):
        check_config("dpo", DPOConfig(loss_type="robust", label_smoothing=0.5))
    with pytest.raises(ValueError, match=r"policy.kto.beta must be above 0, got 0.*undesirable_weight must be above"):
        check_config("kto", KTOConfig(beta=0.0, undesirable_weight=-1.0))
    # KTO's reference point pairs each prompt with another row's response: a batch of one has no other row
    with pytest.raises(ValueError) as refused:
        check_config("kto", KTOConfig(batch_size=1))
    assert str(refused.value) == (
        "policy.kto.batch_size must be at least 2 (KTO's reference point pairs each prompt with another row's "
        "response), got 1"
    )
    check_config("dpo", DPOConfig(batch_size=1))  # one comparison holds its own pairs


def test_kto_needs_two_training_rows_and_held_out_parts_of_two(tmp_path):
    """One feedback row for training is refused before any model loads (the model named here does not exist), and the
    held-out rows are read in parts of at least two, the last short part joined to the one before."""
    (tmp_path / "feedback").mkdir()
    row = {"id": "a", "prompt": "The film was", "response": "great fun", "label": 1}
    (tmp_path / "feedback" / "x.jsonl").write_text(json.dumps(row) + "\n")
    model = ModelConfig(name="none", name_or_path=str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"^policy=kto trains on .* has 1 for training \(at least 2\)$"):
        train_direct(
            "kto", KTOConfig(), PPOConfig(), model, str(tmp_path / "none"), None, tmp_path, tmp_path / "o", 0.0
        )
    assert [len(p) for p in eval_batches(list(range(9)), 4)] == [4, 5]
    assert [len(p) for p in eval_batches(list(range(8)), 4)] == [4, 4]
    assert [len(p) for p in eval_batches(list(range(3)), 4)] == [3]


def test_responses_are_encoded_as_generation_reads_them(stages):
    from components.models.chat import prompt_and_response
    from components.models.loading import load_tokenizer

    tok = load_tokenizer(stages.sft_dir, stages.cfg.model)
    prompts, responses = ["The film was", "A longer prompt about the kettle"], ["great fun", "it broke after a week"]
    ro = encode_responses(tok, prompts, responses, 64, 64, "cpu")
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = ro.sequence[i][ro.sequence_mask[i].bool()].tolist()
        assert ids == tok(prompt_and_response(tok, p, r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ro.ended.all() and ro.query_mask[0, 0] == 0, "prompts left-padded, responses end with EOS"
    cut = encode_responses(tok, prompts, responses, 64, 2, "cpu")
    assert cut.response.shape[1] == 2 and not cut.ended.any(), "a cut response has no EOS"


# ---- on the demo
STEPS = {"dpo": 100, "kto": 100}


def keeping_roles(module, built: list):
    """`module.build_policy_roles`, wrapped to keep the roles the stage builds (its model, after training)."""
    build = module.build_policy_roles
    return lambda *a, **k: built.append(build(*a, **k)) or built[-1]


@pytest.fixture(scope="module", params=["dpo", "kto"])
def trained(request, stages, reward, tmp_path_factory):
    method, cfg = request.param, stages.cfg
    settings = replace(getattr(cfg.policy, method), steps=STEPS[method], save_every=50)
    out = tmp_path_factory.mktemp(method)
    ppo = replace(cfg.ppo, eval_max_prompts=32)
    built: list = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(policy_run, "build_policy_roles", keeping_roles(policy_run, built))
        result = train_direct(
            method,
            settings,
            ppo,
            cfg.model,
            stages.sft_dir,
            reward.head_dir,
            cfg.data_path,
            out,
            cfg.reward.eval_fraction,
        )
    return method, out, result, built[0]


def test_the_held_out_reward_rises_over_sft_with_the_kl_small(trained):
    method, _, result, _ = trained
    m = result.metrics
    assert len(result.history) == STEPS[method]
    assert m[f"{method}/chosen_logratio"] > m[f"{method}/rejected_logratio"], "the judgements are learned"
    assert m[f"{method}/eval_reward"] > m[f"{method}/eval_reward_ref"] + 0.15, m
    assert 0 < m[f"{method}/eval_kl"] < 5, m
    if method == "dpo":
        assert m["dpo/eval_accuracy"] > 0.75, "held-out comparisons ordered as the people did"
    else:
        assert m["kto/eval_auc"] > 0.85, "held-out thumbs separated by the implicit reward"


def test_only_the_policy_adapter_trains_against_the_sft_model_and_the_outputs_take_ppos_layout(stages, trained):
    """On the model the stage trained: its trainable parameters are exactly the policy adapter it saved, every base
    weight is still the SFT file's, and the log-ratio the loss reads is the policy's log-prob less that
    of the SFT model loaded on its own, from which the policy has moved."""
    _, out, result, roles = trained
    assert checkpoint.is_complete(out) and Path(result.policy_dir) == out / "final" / "policy"
    assert (Path(result.policy_dir) / "tokenizer.json").exists()
    adapter = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    trainable = {n.replace(".policy.", "."): p for n, p in roles.model.named_parameters() if p.requires_grad}
    assert adapter and trainable.keys() == adapter.keys() and all("lora_" in k for k in adapter)
    assert all(torch.equal(p.detach().cpu(), adapter[k]) for k, p in trainable.items()), "the trained adapter, saved"
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B starts at zero: it must move"
    sft = load_file(str(Path(stages.sft_dir) / "model.safetensors"))
    base = {
        n.replace(".base_layer", ""): p for n, p in roles.model.get_base_model().named_parameters() if "lora_" not in n
    }
    assert base.keys() == sft.keys()
    # to float rounding: the held-out sampling folds the LoRA into the base and out again (`lora_merged`), which
    # leaves fp32 weights within an ulp or two (1.5e-8 here); a training step would move them by ~ the learning rate
    changed = [k for k, p in base.items() if not torch.allclose(p.detach().cpu(), sft[k], rtol=0, atol=1e-6)]
    assert not changed, f"SFT weights changed in training: {changed}"

    from components.models.loading import load_causal_lm

    ro = encode_responses(
        roles.tok, ["The film was", "The kettle"], ["great fun", "broke"], 64, 16, direct.device_of(roles)
    )
    q_len, mask = ro.query.shape[1], ro.response_mask.float()
    with torch.no_grad():
        ratio, _ = logratios(roles, ro)
        policy = (logprobs_of(policy_logits(roles, ro.sequence, ro.sequence_mask, q_len), ro.response) * mask).sum(1)
        sft_model = load_causal_lm(stages.sft_dir, stages.cfg.model, direct.device_of(roles)).eval()
        sft_logits = sft_model(input_ids=ro.sequence, attention_mask=ro.sequence_mask).logits[:, q_len - 1 : -1]
        reference = (logprobs_of(sft_logits, ro.response) * mask).sum(1)
    assert torch.allclose(ratio, policy - reference, atol=1e-4), "the reference is the SFT model"
    assert (ratio.abs() > 0.05).all(), "the policy moved from the reference"


class Killed(Exception):
    """Where a kill would end the process."""


def killed_at(m: pytest.MonkeyPatch, module, name: str, call: int) -> None:
    """`module.name` raises Killed on its `call`-th call (a step's part: the step before has been checkpointed)."""
    real, calls = getattr(module, name), []

    def part(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise Killed
        return real(*a, **k)

    m.setattr(module, name, part)


def untimed(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if "time" not in k and "seconds" not in k} for row in rows]


def test_dropout_is_off_in_the_policy_and_the_reference(stages, reward, tmp_path, monkeypatch):
    """As TRL's trainers (disable_dropout=True): with LoRA dropout and a base whose attention drops out, the log-probs a
    training step reads are the same on every forward, the policy's and the reference's, in training mode."""
    cfg, base = stages.cfg, tmp_path / "sft"
    shutil.copytree(stages.sft_dir, base)  # the SFT model, with dropout in its attention
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    ppo = replace(cfg.ppo, lora=replace(cfg.ppo.lora, dropout=0.5), eval_max_prompts=1)
    seen: dict = {}

    def first_step(roles, rows, settings, ppo_cfg):
        device = direct.device_of(roles)
        ro = encode_responses(roles.tok, [r.prompt for r in rows], [r.response for r in rows], 64, 16, device)

        def forward() -> torch.Tensor:
            return logprobs_of(policy_logits(roles, ro.sequence, ro.sequence_mask, ro.query.shape[1]), ro.response)

        with torch.no_grad():
            seen["policy"] = forward(), forward()
            with roles.use(REFERENCE):
                seen["reference"] = forward(), forward()
        seen["training"] = roles.model.training
        seen["asked"] = roles.model.peft_config["policy"].lora_dropout, roles.model.config.attention_dropout
        raise Killed

    monkeypatch.setattr(direct, "kto_batch", first_step)
    settings = replace(cfg.policy.kto, steps=1, batch_size=4)
    with pytest.raises(Killed):
        train_direct("kto", settings, ppo, cfg.model, str(base), reward.head_dir, cfg.data_path, tmp_path / "o")
    assert seen["asked"] == (0.5, 0.5) and seen["training"]
    assert torch.equal(*seen["policy"]), "the policy's log-probs differ between two forwards: dropout is on"
    assert torch.equal(*seen["reference"]), "the reference's log-probs differ between two forwards: dropout is on"


def test_a_run_killed_and_resumed_ends_where_an_uninterrupted_run_does(stages, reward, tmp_path, monkeypatch):
    """A run killed in its second step, run again in its dir, resumes from its own step-1 checkpoint and ends where an
    uninterrupted run does: the same history (times aside), adapter and held-out accuracy. Each run computes its own
    steps, so the first row is compared between two runs, not copied from one into the other."""
    cfg = stages.cfg
    short = replace(cfg.policy.kto, steps=2, batch_size=4, save_every=1, eval_max_examples=8)
    ppo = replace(cfg.ppo, eval_max_prompts=0)  # no held-out sampling: the adapters compared say more, in less time
    args = ("kto", short, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path)
    full = train_direct(*args, tmp_path / "full", seed=1)
    with monkeypatch.context() as m:
        killed_at(m, direct, "kto_batch", call=2)
        with pytest.raises(Killed):
            train_direct(*args, tmp_path / "run", seed=1)
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir() and not checkpoint.is_complete(tmp_path / "run")
    resumed = train_direct(*args, tmp_path / "run", seed=1)
    assert resumed.metrics["kto/resumed_from_step"] == 1 and full.metrics["kto/resumed_from_step"] == 0
    assert len(resumed.history) == len(full.history) == 2
    for got, want in zip(untimed(resumed.history), untimed(full.history), strict=True):
        assert got == pytest.approx(want, abs=1e-5, nan_ok=True)
    (got,), (want,) = (untimed([{k: v for k, v in r.metrics.items() if "resumed" not in k}]) for r in (resumed, full))
    assert got == pytest.approx(want, abs=1e-5, nan_ok=True)
    adapters = [load_file(str(Path(r.policy_dir) / "adapter_model.safetensors")) for r in (resumed, full)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0]), "the same adapter"
