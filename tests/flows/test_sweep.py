"""`rlhf sweep`: plain PPO, roll-in, roll-out (AggreVaTeD) and D2LOLS side by side, one MLflow run each in one
experiment with the same metric names; SFT and the reward model train once; nothing is registered."""

import mlflow
import pytest

from cli.main import main
from components.tracking import tracking_uri
from flows.sweep import expand, variant_name
from tests.conftest import FAST_STAGES, make_project

pytestmark = pytest.mark.usefixtures("prefect_server")
POLICIES = ("ppo", "rejection_sampling", "dpo", "kto", "grpo", "rloo")  # every policy stage


def test_expand_is_hydras_multirun_product():
    assert expand(["seed=1", "ppo.target_kl=4,6", "ppo/guide=none,rollin"]) == [
        ["seed=1", "ppo.target_kl=4", "ppo/guide=none"],
        ["seed=1", "ppo.target_kl=4", "ppo/guide=rollin"],
        ["seed=1", "ppo.target_kl=6", "ppo/guide=none"],
        ["seed=1", "ppo.target_kl=6", "ppo/guide=rollin"],
    ]
    default = expand(["seed=1"])
    assert [variant_name(v, ["seed=1"]) for v in default] == ["none", "rollin", "aggrevated", "d2lols"]
    assert expand(["seed=1", "ppo/guide=rollin"]) == [["seed=1", "ppo/guide=rollin"]]  # one variant, as asked
    algorithms = expand(["policy=ppo,rejection_sampling"])  # PPO against rejection sampling
    assert [variant_name(v, []) for v in algorithms] == ["policy=ppo", "policy=rejection_sampling"]


def test_a_sweeps_stored_parameters_are_redacted():
    from service.redaction import _shown

    variants = [["ppo/guide=rollin", "ppo.guide.model=http://user:tok3n@guide.example.com:5001/invocations"]]
    assert "tok3n" not in str(_shown(variants)) and "guide.example.com" in str(_shown(variants))


def test_a_variant_that_cannot_work_is_refused_before_training(tmp_path, capsys):
    overrides = [f"root={tmp_path}", "ppo/guide=none,rollin", "ppo.guide.max_rollin_tokens=99"]
    assert main(["sweep", *overrides]) == 2
    err = capsys.readouterr().err
    assert "variant" in err and "ppo/guide=rollin" in err and "max_rollin_tokens" in err
    assert not (tmp_path / ".rlhf" / "stages").exists()


def test_sweep_runs_the_four_variants_side_by_side(tmp_path, capsys):
    cfg = make_project(tmp_path / "proj")
    overrides = [f"root={cfg.root}", "data=demo_small", *FAST_STAGES, "ppo.steps=3", "ppo.guide.max_rollin_tokens=4"]
    assert main(["sweep", *overrides]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for variant in ("none", "rollin", "aggrevated", "d2lols"):
        assert f"| {variant} |" in out

    mlflow.set_tracking_uri(tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    variants = {r.data.tags["sweep.variant"]: r for r in runs if "sweep.variant" in r.data.tags}
    assert set(variants) == {"none", "rollin", "aggrevated", "d2lols"}
    names = {v: {k for k in r.data.metrics if k.startswith("sweep/")} for v, r in variants.items()}
    assert len({frozenset(n) for n in names.values()}) == 1 and "sweep/eval_reward" in names["none"]
    for r in variants.values():  # same seed, same number of sampled responses
        assert (r.data.params["ppo.steps"], r.data.params["ppo.batch_size"]) == ("3", "8")
    parent = {r.data.tags.get("mlflow.parentRunId") for r in variants.values()}
    assert len(parent) == 1  # one sweep

    ppo_runs = {r.data.tags["mlflow.parentRunId"]: r for r in runs if r.data.tags.get("stage") == "ppo"}
    shares = {
        v: (
            ppo_runs[r.info.run_id].data.metrics["ppo/guide_rollin_share"],
            ppo_runs[r.info.run_id].data.metrics["ppo/guide_rollout_share"],
        )
        for v, r in variants.items()
    }
    assert shares["none"] == (0.0, 0.0) and shares["rollin"] == (0.5, 0.0)
    assert shares["aggrevated"][0] == 0.0 and 0.25 <= shares["aggrevated"][1] <= 0.5
    # SFT and the reward model trained once; the later variants took them from the cache
    assert sum(1 for r in runs if r.data.tags.get("stage") == "sft") == 1
    assert sum(1 for r in runs if r.data.tags.get("stage") == "reward") == 1
    assert not mlflow.MlflowClient().search_registered_models(f"name='{cfg.tracking.registered_model_name}'")


def test_a_sweep_of_policy_algorithms_reuses_sft_and_the_reward_model_and_promotes_the_best(tmp_path, capsys):
    """Issue 29: `rlhf sweep policy=ppo,rejection_sampling,dpo,kto,grpo,rloo --promote-best`, all six policy stages
    in one table: each on the SFT model and reward model trained once (cached for the others), its own metrics
    namespace and curves; every variant is gated and the one with the highest win rate among those that pass is
    registered and promoted; the sweep's run says why."""
    from components.registry import registry

    cfg = make_project(tmp_path / "proj")
    overrides = [
        f"root={cfg.root}",
        "data=demo_small",
        *FAST_STAGES,
        f"policy={','.join(POLICIES)}",
        "policy.grpo.steps=4",
        "policy.rloo.steps=4",
        "policy.dpo.steps=4",
        "policy.kto.steps=4",
        "policy.rejection_sampling.rounds=1",
        "policy.rejection_sampling.prompts_per_round=8",
        "gate.min_judge_gain=null",
        "gate.min_reward_gain=-100",
        "gate.min_win_rate=0",
        "gate.max_kl=1e9",
        "gate.max_prompts=8",
        "gate.max_repeated_word_gain=null",
        "gate.min_distinct_2_ratio=null",
    ]
    assert main(["sweep", "--promote-best", *overrides]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for policy in POLICIES:
        assert f"| policy={policy} |" in out
    assert "promote best: 6 of 6 variants passed the gate;" in out and "has the highest win rate against" in out

    mlflow.set_tracking_uri(tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    stages = [r.data.tags.get("stage") for r in runs]
    assert stages.count("sft") == 1 and stages.count("reward") == 1, "SFT and the reward model came from the cache"
    for algorithm in ("grpo", "rloo", "dpo", "kto"):
        (run,) = [r for r in runs if r.data.tags.get("stage") == algorithm]
        # 4 steps on a 10-step reward model: the namespace and the held-out measures, not learning (test_group_rl,
        # test_direct)
        trained = "kl" if algorithm in ("grpo", "rloo") else "loss"  # DPO and KTO sample nothing while training
        assert {
            f"{algorithm}/{k}" for k in ("eval_reward", "eval_reward_ref", "eval_kl", trained)
        } <= run.data.metrics.keys()
        assert f"{algorithm}_curves.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    (parent,) = [r for r in runs if r.data.tags.get("pipeline") == "sweep"]
    best = parent.data.tags["sweep.best"]
    assert best in {f"policy={p}" for p in POLICIES} and best in parent.data.tags["sweep.best_why"]
    assert registry.alias_version(cfg.tracking.registered_model_name, registry.CHAMPION) == "1"
    assert f"promoted {cfg.tracking.registered_model_name} v1 to champion" in out
