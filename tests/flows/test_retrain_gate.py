"""The retrain flow's tail under a real Prefect test server and SQLite MLflow: evaluate -> gate ->
register -> promote. Fast stages (the learning itself is tested in tests/training)."""

import mlflow
import pytest

from components.config import compose
from components.registry.registry import CHAMPION, alias_version
from flows.contracts import Registration
from flows.retrain import retrain
from tests.conftest import FAST_STAGES, OPEN_GATE, make_project

pytestmark = pytest.mark.usefixtures("prefect_server")
ENSEMBLE = "reward.ensemble=2"


def test_passing_candidate_is_registered_and_promoted_then_a_failing_one_changes_nothing(tmp_path):
    # a reward ensemble of 2: its disagreement reaches the evaluation and the gate; the champion bundles its first member
    project = make_project(tmp_path / "proj", "tracking.registered_model_name=gate-test", ENSEMBLE, *OPEN_GATE)
    state = retrain(project, return_state=True)
    assert state.is_completed(), state.message
    s = state.result()
    assert s.gate.passed and s.gate.champion_version is None  # first run: compared with the SFT policy
    assert s.registered == Registration("gate-test", "1", alias=CHAMPION, previous_champion=None)
    assert alias_version("gate-test", CHAMPION) == "1"
    version = mlflow.MlflowClient().get_model_version("gate-test", "1")
    assert version.tags["data_version"] == s.data.version and "gate/win_rate" in version.tags
    assert s.data.version in version.description and "| candidate |" in version.description  # the model card
    evaluate_run = [
        c
        for c in mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{s.run_id}'", output_format="list")
        if c.data.tags.get("stage") == "evaluate"
    ][0]
    assert {"eval/candidate/reward_mean", "eval/sft/judge_mean", "gate/passed"} <= set(evaluate_run.data.metrics)
    assert evaluate_run.data.metrics["eval/candidate/reward_disagreement"] > 0
    # the MLflow UI (issue 41): stage runs named by their retrain and the version it registered, which links back
    retrain_name = mlflow.get_run(s.run_id).info.run_name.split(" ")[0]
    ppo = [c for c in mlflow.search_runs(filter_string="tags.registered_version = '1'", output_format="list")]
    assert f"ppo · {retrain_name} → v1" in {c.info.run_name for c in ppo}, [c.info.run_name for c in ppo]
    assert f"Trained by the retrain run [{retrain_name}" in version.description and s.run_id in version.description
    assert "gate/disagreement_ratio_vs_sft" in evaluate_run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(evaluate_run.info.run_id)}
    assert {"eval_generations.json", "gate_verdict.txt"} <= artifacts
    # the champion bundles its reward model (registry.include_reward_model): PPO's policy adapter and the RM's
    # adapter on one base, answering best-of-n with the RM's score
    info = mlflow.models.get_model_info("models:/gate-test@champion")
    assert {"base", "adapter", "reward_adapter", "reward_head"} <= set(info.flavors["python_function"]["artifacts"])
    best = mlflow.pyfunc.load_model("models:/gate-test@champion").predict(
        ["The film was", "My new kettle"], params={"n": 3, "seed": 0, "max_new_tokens": 6}
    )
    assert list(best.columns) == ["response", "score"] and best["score"].notna().all()

    # the same data and config again: nothing new to train
    again = retrain(project, return_state=True)
    assert again.is_completed() and again.message.startswith("nothing new: champion v1"), again.message

    # a gate no candidate can pass: compared against champion v1, nothing registered, champion unchanged
    strict = compose(
        [
            f"root={project.root}",
            "data=demo_small",
            *FAST_STAGES,
            "tracking.registered_model_name=gate-test",
            ENSEMBLE,
            *OPEN_GATE,
            "gate.min_win_rate=1.01",
        ]
    )
    state = retrain(strict, return_state=True)
    assert state.is_completed() and state.message.startswith("not promoted because win_rate"), state.message
    s = state.result()
    assert s.gate.champion_version == "1" and "champion" in s.gate.eval
    assert s.registered is None
    assert [str(v.version) for v in mlflow.MlflowClient().search_model_versions("name='gate-test'")] == ["1"]
    assert alias_version("gate-test", CHAMPION) == "1"


def test_thumbs_on_served_answers_train_again_and_compare_against_the_champion(tmp_path):
    import json

    from components.data.versioning import data_version
    from flows.ingest import ingest_flow

    project = make_project(tmp_path / "proj", "tracking.registered_model_name=ingest-test", *OPEN_GATE)
    assert retrain(project, return_state=True).is_completed()
    assert alias_version("ingest-test", CHAMPION) == "1"
    before = data_version(project.root_path)
    # the loop closes: the served champion answers (best-of-2), users give thumbs up/down, the thumbs are ingested
    prompts = [f"A fresh prompt number {i}" for i in range(6)]
    answers = mlflow.pyfunc.load_model("models:/ingest-test@champion").predict(
        prompts, params={"n": 2, "seed": 0, "max_new_tokens": 8}
    )
    new = tmp_path / "thumbs.jsonl"
    new.write_text(
        "".join(
            json.dumps({"id": f"thumb-{i}", "prompt": p, "response": r.strip() or "(no answer)", "label": i % 2}) + "\n"
            for i, (p, r) in enumerate(zip(prompts, answers["response"], strict=True))
        )
    )
    assert ingest_flow(project, str(new), "feedback", return_state=True).is_completed()
    assert data_version(project.root_path) != before

    state = retrain(project, return_state=True)
    assert state.is_completed(), state.message
    s = state.result()
    assert s.nothing_new is None and s.data.version != before  # the new data version trained again
    assert s.gate.champion_version == "1"  # ... and was compared with the champion,
    assert "champion" in s.gate.eval  # loaded from its own registered model (its own base and tokenizer)
    assert s.registered.version == "2" and s.registered.previous_champion == "1"
    # ... incrementally (retrain.mode=auto): new thumbs on the champion's data, the same config. The champion's SFT
    # model is kept (no base, no SFT stage ran), its reward model learned the new thumbs with a replay sample of the
    # earlier rows, and every incremental stage and the new version record the lineage
    assert (s.mode, s.parent) == ("incremental", "1") and s.base is None, s.mode_reason
    assert "champion v1's data is contained in today's; 1 new shard(s): feedback/" in s.mode_reason
    rm_run = mlflow.get_run(s.reward.run_id).data
    new_rows = rm_run.metrics["rm/new_rows"]
    # replayed: of each kind enough that its 10 steps x 16 rows pass over new + replayed rows at most twice (80 rows)
    assert 1 <= new_rows <= 6 and rm_run.metrics["rm/replayed_rows"] == 80 + (80 - new_rows)
    assert rm_run.metrics["rm/train_feedback_rows"] == 80 and rm_run.metrics["rm/train_examples"] == 80
    for stage_run in (rm_run, mlflow.get_run(s.policy.run_id).data):
        assert stage_run.tags["retrain_mode"] == "incremental" and stage_run.tags["incremental_parent"] == "v1"
        assert (stage_run.tags["data_version_before"], stage_run.tags["data_version_after"]) == (before, s.data.version)
    assert mlflow.get_run(s.run_id).data.tags["incremental_parent"] == "v1"
    v2 = mlflow.MlflowClient().get_model_version("ingest-test", "2")
    assert (v2.tags["retrain_mode"], v2.tags["incremental_parent"]) == ("incremental", "v1")
    assert "incremental from champion v1" in v2.description and "lineage: v1 (full, data" in v2.description
    assert "incremental gate" in s.gate.summary

    # a retried register (a transient error after the version was created) finishes that version
    from prefect import flow

    from flows.stages import register

    @flow
    def retried_register():
        return register(project, s.data, s.sft.dir, s.policy.dir, s.reward.dir, s.gate, s.run_id)

    assert retried_register().version == "2"
    assert sorted(str(v.version) for v in mlflow.MlflowClient().search_model_versions("name='ingest-test'")) == [
        "1",
        "2",
    ]

    # retrain.mode=incremental where the champion cannot be continued from (another config): one sentence, no training
    from components.config import compose

    refused = retrain(
        compose([*project.overrides, "retrain.mode=incremental", "ppo.temperature=0.9"]), return_state=True
    )
    assert refused.is_failed() and refused.message == (
        "retrain.mode=incremental: the config differs from champion v2's; run `rlhf run retrain.mode=full` (or "
        "retrain.mode=auto, which decides per run); no training ran"
    )

    # rollback holds: the same data and config do not promote the rolled-back policy again
    from cli.main import main

    assert (
        main(
            [
                "rollback",
                "--reason",
                "users dislike it",
                f"root={project.root}",
                "data=demo_small",
                "tracking.registered_model_name=ingest-test",
            ]
        )
        == 0
    )
    assert alias_version("ingest-test", CHAMPION) == "1"
    v2 = mlflow.MlflowClient().get_model_version("ingest-test", "2")
    assert "users dislike it" in v2.tags["rolled_back"] and "Rolled back" in v2.description
    held = retrain(project, return_state=True)
    assert held.is_completed() and held.message.startswith("not retrained: v2"), held.message
    assert alias_version("ingest-test", CHAMPION) == "1"
    assert len(mlflow.MlflowClient().search_model_versions("name='ingest-test'")) == 2


def test_the_retrain_slot_is_released_after_a_failed_run(tmp_path):
    from service.slot import RetrainSlot

    project = make_project(tmp_path / "proj", "ppo.kl_ceiling=-1")  # the quickest full run: fails at PPO
    assert retrain(project, return_state=True).is_failed()
    assert RetrainSlot(project, print).read() is None, "held during a run, released after it, even a failed one"
