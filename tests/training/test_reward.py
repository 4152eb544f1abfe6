"""Reward model: hand-computed Bradley-Terry loss and ranking expansion; on the demo (tiny, CPU) a
held-out pairwise accuracy well above 0.8; only the LoRA adapter and head train; exact resume; the output
dir is complete only once a run has written all of it."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.data.readers import Pair, ranking_to_pairs, read_preferences
from components.models.loading import load_causal_lm, load_tokenizer
from components.models.roles import ScalarHead, last_token_index, sequence_scores
from components.models.scoring import encode
from components.training import checkpoint
from components.training import reward as reward_module
from components.training.reward import (
    binary_auc,
    bradley_terry_loss,
    example_chunks,
    feedback_loss,
    index_comparisons,
    pairwise_accuracy,
    score_comparisons,
    train_reward,
)


def test_ranking_to_pairs_hand_computed():
    assert ranking_to_pairs(["a", "b", "c"]) == [("a", "b", 1 / 3), ("a", "c", 1 / 3), ("b", "c", 1 / 3)]
    four = ranking_to_pairs(["a", "b", "c", "d"])
    assert [(c, r) for c, r, _ in four] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert all(w == pytest.approx(1 / 6) for _, _, w in four)
    assert ranking_to_pairs(["a", "b"]) == [("a", "b", 1.0)]
    assert ranking_to_pairs(["a"]) == []


def test_bradley_terry_loss_hand_computed():
    # pair 1: margin 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.3132617; pair 2: margin 0 -> log 2 = 0.6931472
    # weights 1 and 0.5 -> (0.3132617 + 0.5 * 0.6931472) / 1.5 = 0.4398902
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx(0.4398902, abs=1e-6)
    # a ranking's pairs (weights 1/3 each) weigh as much as one pairwise example
    one = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    three = bradley_terry_loss(torch.tensor([2.0] * 3), torch.tensor([0.0] * 3), torch.full((3,), 1 / 3))
    assert one.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6) == pytest.approx(three.item())


def test_pairwise_accuracy_hand_computed():
    # right, wrong, tie (counts half); weights 1, 1, 2 -> (1 + 0 + 2 * 0.5) / 4 = 0.5
    acc = pairwise_accuracy(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 2.0]))
    assert acc.item() == pytest.approx(0.5)


def test_feedback_loss_hand_computed():
    # z = score + bias = 1.5, -0.5, 0.5; targets 1 (thumbs up), 0 (down), 0.75 (a rating of 4 on 1..5)
    # BCE: log(1 + e^-1.5) = 0.2014133; log(1 + e^-0.5) = 0.4740770;
    #      0.75 * log(1 + e^-0.5) + 0.25 * log(1 + e^0.5) = 0.75 * 0.4740770 + 0.25 * 0.9740770 = 0.5990770
    # mean = (0.2014133 + 0.4740770 + 0.5990770) / 3 = 0.4248558
    scores, targets = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([1.0, 0.0, 0.75])
    bias = torch.tensor(0.5, requires_grad=True)
    loss = feedback_loss(scores, bias, targets)
    assert loss.item() == pytest.approx(0.4248558, abs=1e-6)
    # d loss / d bias = mean(sigmoid(z) - t) = (0.8175745 - 1 + 0.3775407 - 0 + 0.6224593 - 0.75) / 3 = 0.0225248
    loss.backward()
    assert bias.grad.item() == pytest.approx(0.0225248, abs=1e-6)
    # Bradley-Terry is blind to a shift of every score: only the feedback term fixes the score's zero
    c, r, w = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]), torch.ones(2)
    assert bradley_terry_loss(c + 3, r + 3, w).item() == pytest.approx(bradley_terry_loss(c, r, w).item(), abs=1e-6)


def test_binary_auc_hand_computed():
    # thumbs up scored 3 and 2, down 1 and 2: (3>1) (3>2) (2>1) (2=2: half) -> 3.5 / 4
    assert binary_auc(torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.875)
    assert binary_auc(torch.tensor([0.0, 1.0]), torch.tensor([1, 0])) == 0.0
    assert math.isnan(binary_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))  # one label only


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]


def test_each_ranking_weighs_one_example(stages):
    train, evals = read_preferences(stages.cfg.data_path, 0.1)
    assert len(train) + len(evals) == stages.cfg.data.n_preferences
    for ex in train + evals:
        assert sum(p.weight for p in ex) == pytest.approx(1.0)
    assert any(len(ex) > 1 for ex in train), "the demo has rankings"


def test_reward_model_ranks_held_out_preferences(reward):
    m = reward.metrics
    # measured 0.853 (0.84-0.86 across settings) (demo labels agree with the latent preference only 91% of the time)
    assert m["rm/eval_accuracy"] > 0.80, m
    assert m["rm/eval_accuracy_pairwise"] > 0.78, m
    assert m["rm/eval_margin"] > 0.5, m
    assert m["rm/eval_pairs"] > m["rm/eval_examples"], "rankings expanded to pairs"


def test_reward_model_learns_the_held_out_thumbs(reward):
    m = reward.metrics
    assert m["rm/eval_feedback_rows"] > 50 and m["rm/train_feedback_rows"] > 500, m
    # the annotator's thumbs are a noisy threshold on the same latent score the comparisons are drawn from
    assert m["rm/feedback_auc"] > 0.8, m
    assert m["rm/feedback_accuracy"] > 0.7, m


def test_reward_model_trains_on_feedback_alone(stages, tmp_path):
    # the forum user's case: thumbs up/down and no comparisons at all
    cfg = stages.cfg
    data = tmp_path / "data"
    shutil.copytree(cfg.data_path, data)
    shutil.rmtree(data / "preferences")
    short = replace(cfg.reward, max_steps=40, log_steps=10, stats_max_responses=64)
    m = train_reward(short, cfg.model, stages.sft_dir, data, tmp_path / "rm", seed=1, data_cfg=cfg.data).metrics
    assert math.isnan(m["rm/eval_accuracy"]) and m["rm/train_pairs"] == 0
    assert m["rm/feedback_auc"] > 0.7, m
    shutil.rmtree(data / "feedback")
    with pytest.raises(ValueError, match="needs preferences .* or feedback"):
        train_reward(short, cfg.model, stages.sft_dir, data, tmp_path / "rm2", seed=1)


def test_reward_stats_saved_with_the_model(stages, reward):
    meta = json.loads((Path(reward.head_dir) / "head.json").read_text())
    assert meta["reward_std"] > 0 and math.isfinite(meta["reward_mean"])
    assert meta["reward_mean"] == pytest.approx(reward.metrics["rm/reward_mean"])
    assert meta["base"] == stages.sft_dir


def test_only_lora_and_head_train(stages, reward):
    from peft import PeftModel

    cfg = stages.cfg
    adapter = load_file(str(Path(reward.adapter_dir) / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B starts at zero: it must move"
    sft_before = load_file(str(Path(stages.sft_dir) / "model.safetensors"))
    base = load_causal_lm(stages.sft_dir, cfg.model)
    for k, v in base.state_dict().items():
        assert torch.equal(v, sft_before.get(k, v)), f"base weight {k} changed"
    # the trained scorer orders a clearly positive and a clearly negative continuation
    model = PeftModel.from_pretrained(base, reward.adapter_dir)
    head, _ = ScalarHead.load(Path(reward.head_dir))
    tok = load_tokenizer(stages.sft_dir, cfg.model)
    ids, mask = encode(
        tok, ["The film was"] * 2, ["wonderful and moving, a delight.", "dull and awful, a waste."], 96, "cpu"
    )
    with torch.no_grad():
        good, bad = sequence_scores(model, head, ids, mask).tolist()
    assert good > bad


def test_resume_from_checkpoint_matches_uninterrupted_run(stages):
    cfg = stages.cfg
    short = replace(cfg.reward, max_steps=30, save_steps=10, log_steps=10, stats_max_responses=64)
    full_dir, resumed_dir = stages.root / "rm-full", stages.root / "rm-resumed"
    full = train_reward(short, cfg.model, stages.sft_dir, cfg.data_path, full_dir, seed=1)
    # a run killed after step 20: only the checkpoints up to step 20 exist
    shutil.copytree(full_dir / "checkpoints" / "step-0000020", resumed_dir / "checkpoints" / "step-0000020")
    resumed = train_reward(short, cfg.model, stages.sft_dir, cfg.data_path, resumed_dir, seed=1)
    assert resumed.metrics["rm/resumed_from_step"] == 20 and full.metrics["rm/resumed_from_step"] == 0
    a = load_file(str(full_dir / "head.safetensors"))
    b = load_file(str(resumed_dir / "head.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    bias = [json.loads((d / "head.json").read_text())["feedback_bias"] for d in (full_dir, resumed_dir)]
    assert bias[0] != 0 and bias[0] == pytest.approx(bias[1], abs=1e-5), "the feedback bias trains and resumes"
    assert resumed.metrics["rm/eval_accuracy"] == pytest.approx(full.metrics["rm/eval_accuracy"], abs=1e-6)
    # a different config does not resume from these checkpoints
    other = train_reward(
        replace(short, learning_rate=1e-4), cfg.model, stages.sft_dir, cfg.data_path, resumed_dir, seed=1
    )
    assert other.metrics["rm/resumed_from_step"] == 0


def test_output_dir_is_complete_only_when_a_run_finished(stages, monkeypatch):
    # the flow reuses a stage dir only if it is complete: a killed run's partial dir must not pass for one
    cfg = stages.cfg
    tiny = replace(cfg.reward, max_steps=4, save_steps=2, log_steps=2, stats_max_responses=16)
    out = stages.root / "rm-killed"

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(reward_module, "reward_stats", killed)  # dies after training, before the outputs are written
    with pytest.raises(Killed):
        train_reward(tiny, cfg.model, stages.sft_dir, cfg.data_path, out, seed=1)
    assert out.is_dir() and not checkpoint.is_complete(out)
    monkeypatch.undo()
    train_reward(tiny, cfg.model, stages.sft_dir, cfg.data_path, out, seed=1)  # resumes from its last checkpoint
    assert checkpoint.is_complete(out)
    assert json.loads((out / checkpoint.COMPLETE).read_text())["stage"] == "reward"
    # a recompute into the complete dir, killed after it wrote adapter/ and the head (at its final checkpoint)
    monkeypatch.setattr(checkpoint, "save", killed)
    with pytest.raises(Killed):
        train_reward(tiny, cfg.model, stages.sft_dir, cfg.data_path, out, seed=1)
    assert (out / "adapter").is_dir() and not checkpoint.is_complete(out)


def test_micro_batches_add_up_to_the_whole_batch_loss():
    # the training loop scales each chunk's loss by its share of the weight: the sum is the batch loss
    torch.manual_seed(0)
    rc, rr, w = torch.randn(10), torch.randn(10), torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3, 1.0, 0.1, 0.1, 0.1, 0.1, 1.0])
    chunks = sum(
        bradley_terry_loss(rc[i : i + 4], rr[i : i + 4], w[i : i + 4]) * w[i : i + 4].sum() / w.sum()
        for i in range(0, 10, 4)
    )
    assert chunks.item() == pytest.approx(bradley_terry_loss(rc, rr, w).item(), abs=1e-6)


def _ranking(prompt: str, responses: list[str]) -> list[Pair]:
    return [Pair(prompt, c, r, w) for c, r, w in ranking_to_pairs(responses)]


def test_index_comparisons_encodes_each_response_once():
    # a ranking of 3 (pairs ab, ac, bc) and a pairwise example whose chosen response is also in the ranking
    c = index_comparisons([_ranking("p", ["a", "b", "c"]), [Pair("p", "b", "d", 1.0)]])
    assert list(zip(c.prompts, c.responses, strict=True)) == [("p", "a"), ("p", "b"), ("p", "c"), ("p", "d")]
    assert c.chosen.tolist() == [0, 0, 1, 1] and c.rejected.tolist() == [1, 2, 2, 3]
    assert c.weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    # the same response text under another prompt is another sequence
    assert index_comparisons([[Pair("p", "a", "b", 1.0)], [Pair("q", "a", "b", 1.0)]]).prompts == ["p", "p", "q", "q"]


def test_example_chunks_keep_whole_examples_under_the_sequence_budget():
    rank4, rank3, pair = _ranking("p", list("abcd")), _ranking("q", list("abc")), [Pair("r", "x", "y", 1.0)]
    chunks = example_chunks([rank4, rank3, pair, rank4], max_sequences=6)
    assert chunks == [[rank4], [rank3, pair], [rank4]]  # 4 | 3 + 2 | 4 sequences
    assert example_chunks([rank4], max_sequences=2) == [[rank4]]  # an example over the budget is alone


def test_ranking_once_loss_and_gradient_equal_the_per_pair_ones(stages):
    """Each response of a ranking encoded once (K forwards) gives the per-pair loss (2 * C(K,2) forwards) and the
    same gradient on the LoRA weights and the head."""
    from peft import get_peft_model

    from components.config import LoraConfig
    from components.models.roles import lora_config

    cfg = stages.cfg
    train, _ = read_preferences(cfg.data_path, 0.1)
    examples = [ex for ex in train if len(ex) > 1][:3] + [ex for ex in train if len(ex) == 1][:3]
    assert {len(ex) for ex in examples} - {1}, "the demo has rankings"
    tok = load_tokenizer(stages.sft_dir, cfg.model, padding_side="right")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(stages.sft_dir, cfg.model), lora_config(LoraConfig(dropout=0.0)))
    for name, p in model.named_parameters():  # LoRA B starts at 0: make the adapter matter to the gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    head = ScalarHead(model.config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())

    def loss_and_grads(per_pair: bool):
        for p in params:
            p.grad = None
        if per_pair:  # each pair's chosen and rejected encoded on their own
            pairs = [p for ex in examples for p in ex]
            ids, mask = encode(
                tok, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], 96, "cpu"
            )
            scores = sequence_scores(model, head, ids, mask)
            rc, rr = scores[: len(pairs)], scores[len(pairs) :]
            w = torch.tensor([p.weight for p in pairs])
            n_sequences = 2 * len(pairs)
        else:
            rc, rr, w, _ = score_comparisons(model, head, tok, examples, 96, "cpu")
            n_sequences = len(index_comparisons(examples).prompts)
        loss = bradley_terry_loss(rc, rr, w)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params], n_sequences

    model.eval()  # no dropout: the two ways see the same network
    once, grads_once, n_once = loss_and_grads(per_pair=False)
    pairwise, grads_pairwise, n_pairwise = loss_and_grads(per_pair=True)
    assert once == pytest.approx(pairwise, abs=1e-5)
    for a, b in zip(grads_once, grads_pairwise, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert n_once < n_pairwise  # fewer sequences encoded: the point of it
