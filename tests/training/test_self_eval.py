"""The self-evaluation reward: the softmax ratio by hand, the same number from a real model's logits, the judge
`reference` inside PPO's roles equal to the SFT model itself, no side effects, and on the demo a verdict that
follows the annotator on responses it never saw."""

import math
import random
from dataclasses import replace

import pytest
import torch

from components.config import SelfEvalConfig
from components.data.demo import DemoGenerator
from components.models.loading import load_causal_lm, load_tokenizer
from components.training.reward import binary_auc
from components.training.self_eval import SelfEvalReward, fill, verdict_probability

CFG = SelfEvalConfig()
PROMPTS = ["I watched the movie last night and", "Honest review of the kettle:", "Two words about this tent:"]
RESPONSES = ["the acting was wonderful. I loved it.", "the motor felt broken. Avoid it.", "it is fine, I guess"]


def test_verdict_probability_hand_computed():
    # e^2 / (e^2 + e^1) = 1 / (1 + e^-1) = 0.7310586; the other row: e^0 / (e^0 + e^3) = 0.0474259
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 5.0, 3.0]])
    assert verdict_probability(logits, 0, 2).tolist() == pytest.approx([0.7310586, 0.0474259], abs=1e-6)
    random_logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 4
    p = torch.softmax(random_logits, dim=-1)
    assert torch.allclose(verdict_probability(random_logits, 7, 11), p[:, 7] / (p[:, 7] + p[:, 11]), atol=1e-6)


def test_fill_puts_prompt_and_response_in_the_question():
    assert fill("{prompt} {response}\nQ? A:", ["P"], ["R {x}"]) == ["P R {x}\nQ? A:"]


@pytest.fixture(scope="module")
def judge(stages):
    model = load_causal_lm(stages.sft_dir, stages.cfg.model).eval()
    return model, load_tokenizer(stages.sft_dir, stages.cfg.model, padding_side="left")


def by_hand(model, tok, prompt: str, response: str) -> float:
    """softmax(logits)[yes] / (softmax[yes] + softmax[no]) at the filled template's last token, one text alone."""
    ids = tok(fill(CFG.template, [prompt], [response])[0], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        p = torch.softmax(model(**ids).logits[0, -1], dim=-1)
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (CFG.positive, CFG.negative))
    return (p[yes] / (p[yes] + p[no])).item()


def test_the_reward_is_the_softmax_ratio_of_the_judges_logits_whatever_the_batch(judge):
    model, tok = judge
    reward = SelfEvalReward(CFG, model, tok)
    expected = [by_hand(model, tok, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert reward(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)  # one left-padded batch
    one_by_one = SelfEvalReward(replace(CFG, batch_size=1), model, tok)
    assert one_by_one(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
    assert all(0 < x < 1 for x in expected)


def test_the_reference_judge_in_ppo_is_the_sft_model_with_no_side_effects(stages, judge):
    from components.models.roles import REFERENCE
    from components.training.ppo import build_roles

    cfg = replace(
        stages.cfg.ppo,
        reward_fn="components.training.self_eval:SelfEvalReward",
        use_reward_model=False,
        value_init="fresh",
    )
    roles = build_roles(cfg, stages.cfg.model, stages.sft_dir, None, torch.device("cpu"))
    with torch.no_grad():  # a policy that differs from the SFT model
        for name, p in roles.model.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.normal_(std=0.5)
    assert isinstance(roles.reward_fn, SelfEvalReward)
    roles.model.train()  # as during PPO's update: the judge runs in eval mode and gives training back
    rng, active = torch.get_rng_state(), roles.model.active_adapter
    scores = roles.reward_fn(PROMPTS, RESPONSES)
    assert torch.equal(torch.get_rng_state(), rng) and roles.model.active_adapter == active == "policy"
    assert roles.model.training
    sft_model, tok = judge
    assert scores == pytest.approx(
        [by_hand(sft_model, tok, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)], abs=1e-5
    )
    with roles.use("policy"):  # the policy itself would answer otherwise: the judge really is the reference
        policy_scores = SelfEvalReward(CFG, roles.model, roles.tok)(PROMPTS, RESPONSES)
    assert max(abs(a - b) for a, b in zip(scores, policy_scores, strict=True)) > 1e-3
    with roles.use(REFERENCE):
        assert roles.reward_fn.model is roles.model


def test_answer_words_must_be_single_tokens(judge):
    model, tok = judge
    with pytest.raises(ValueError, match=r"ppo.self_eval.positive=' absolutely certainly' is \d+ tokens"):
        SelfEvalReward(replace(CFG, positive=" absolutely certainly"), model, tok)
    with pytest.raises(ValueError, match="are the same token"):
        SelfEvalReward(replace(CFG, negative=" yes"), model, tok)


def test_on_the_demo_the_verdict_follows_the_annotator_on_unseen_responses(stages, judge):
    # fresh responses (another seed: not the feedback rows the base pretrained on), thumbs from the annotator
    gen = DemoGenerator(replace(stages.cfg.data, seed=999))
    rng = random.Random(0)
    pool = gen.all_prompts()
    rows = [(p, gen.response(dom)) for p, dom in (rng.choice(pool) for _ in range(300))]
    labels = torch.tensor([gen.thumbs(r) for _, r in rows])
    model, tok = judge
    p_yes = torch.tensor(SelfEvalReward(CFG, model, tok)([p for p, _ in rows], [r.text for _, r in rows]))
    auc = binary_auc(p_yes, labels)
    # measured on the tiny demo model: see benchmarks/results/self_eval.md
    assert auc > 0.7, auc
    assert not math.isnan(auc)
