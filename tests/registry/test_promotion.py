"""Issue 38, item 5: moving `champion` is a compare-and-set under the retrain slot's fence. A candidate compared with
v1 is not promoted over a v2 promoted since (retrain, sweep --promote-best), `rlhf rollback` waits for no retrain
and moves nothing while one holds the slot; each refusal is one sentence and `champion` stays where it was.
Real MLflow (SQLite, one store for the module) and the session's Prefect test server; versions are registered
without model files (what is tested is the aliases, not the models)."""

from pathlib import Path

import mlflow
import pytest
from prefect import flow

from components import tracking
from components.data.versioning import DataState
from components.registry import registry
from components.registry.registry import CANDIDATE, CHAMPION, ChampionMoved, alias_version
from flows.contracts import GateOutcome, Registration, RetrainSummary, StageOutput, ValidationSummary
from service.slot import RetrainSlot
from tests.conftest import make_project

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    cfg = make_project(tmp_path_factory.mktemp("promotion") / "proj")
    tracking.setup(cfg)
    return cfg


def new_version(name: str, compared: str | None = None) -> str:
    """A registered version with the tags a retrain's registration sets (`champion_compared`)."""
    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {registry.COMPARED: compared or "none"}
    version = str(client.create_model_version(name, "file:///nowhere", tags=tags).version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


def summary(project, compared: str | None, registered: Registration | None = None) -> RetrainSummary:
    gate = GateOutcome(True, "passed", [], {"gate/win_rate": 0.9}, compared, {})
    data = DataState("d" * 32, "present", {"preferences": 1}, "none", "")
    return RetrainSummary("run", data, ValidationSummary(True, {}, 0, "", None, ""), gate=gate, registered=registered)


def test_the_registry_refuses_a_candidate_compared_with_a_champion_replaced_since(project):
    name = "cas-registry"
    v1 = new_version(name)
    registry.promote(name, v1, approver="auto")
    v2, v3 = new_version(name, compared=v1), new_version(name, compared=v1)  # both compared with v1
    assert registry.promote(name, v2, approver="auto") == v1  # another retrain promotes a newer version first
    with pytest.raises(ChampionMoved, match=f"{name}'s champion moved from v1 to v2 since v3 was compared"):
        registry.promote(name, v3, approver="auto")  # the baseline from its `champion_compared` tag
    with pytest.raises(ChampionMoved):
        registry.promote(name, v3, approver="auto", compared=v1)
    assert alias_version(name, CHAMPION) == v2 and alias_version(name, CANDIDATE) == v3
    assert not {"approver", "previous_champion"} & registry.version_tags(name, v3).keys(), "nothing written"


def test_a_retrain_promotes_only_over_the_champion_its_gate_compared_and_records_the_slot_generation(project):
    from flows.retrain import promote

    name = project.tracking.registered_model_name
    v1 = new_version(name)
    registry.promote(name, v1, approver="auto")
    candidate = new_version(name, compared=v1)
    registry.promote(name, new_version(name, compared=v1), approver="someone")  # v3 moves champion meanwhile
    champion = alias_version(name, CHAMPION)
    with RetrainSlot(project, print, on_lost=lambda: None) as slot, mlflow.start_run():
        refused = promote(project, summary(project, v1, Registration(name, candidate)), slot)
        assert refused.is_failed()
        assert refused.message == (
            f"v{candidate} not promoted: {name}'s champion moved from v1 to v{champion} since v{candidate} was "
            f"compared; run `rlhf run` again to compare against v{champion}"
        )
        assert alias_version(name, CHAMPION) == champion, "the champion is unchanged"

        fresh = new_version(name, compared=champion)
        promoted = promote(project, summary(project, champion, Registration(name, fresh)), slot)
        assert promoted.is_completed(), promoted.message
        tags = registry.version_tags(name, fresh)
        assert tags[registry.SLOT_GENERATION] == str(slot.mine.generation) and tags["previous_champion"] == champion
    assert alias_version(name, CHAMPION) == fresh


def test_the_sweep_cannot_promote_over_a_newer_champion(project, monkeypatch):
    """`rlhf sweep --promote-best` at the level of `promote_the_best` (its registration stubbed: it would log a model):
    the best variant was compared with v1, then champion moved to v2: refused before registering, under the slot.
    Then champion moves while the best is being registered: registered, not promoted."""
    from flows import sweep as sweep_module
    from flows.sweep import SweepRow, SweepSummary, promote_the_best

    name, moves = "cas-sweep", []
    v1 = new_version(name)
    registry.promote(name, v1, approver="auto")

    def register(cfg, data, sft_dir, policy_dir, reward_dir, gate, parent_run_id, lineage=None):
        version = new_version(name, compared=gate.champion_version)
        if moves:  # another promotion lands meanwhile
            registry.promote(name, new_version(name, compared=moves.pop()), approver="someone")
        return Registration(name, version)

    monkeypatch.setattr(sweep_module, "register", register)
    cfg = make_project(Path(project.root), f"tracking.registered_model_name={name}")
    out = StageOutput("/nowhere", "run", {})

    @flow
    def promote_best(compared: str):
        with mlflow.start_run() as run:
            s = summary(project, compared)
            row = SweepRow("policy=grpo", [f"root={project.root}", "data=demo_small"], "run", gate=s.gate)
            row.outputs = (out, out, out)
            best = SweepSummary(run.info.run_id, s.data.version, [row])
            return promote_the_best(cfg, s.data, s.validation, best), best

    registry.promote(name, new_version(name, compared=v1), approver="someone")  # champion v1 -> v2
    state, best = promote_best(v1)
    assert state.is_failed() and best.registered is None
    assert state.message == (
        f"nothing registered: {name}'s champion moved from v1 to v2 since this candidate was compared; "
        "run `rlhf sweep --promote-best` again to compare against v2"
    )
    assert (
        alias_version(name, CHAMPION) == "2" and len(mlflow.MlflowClient().search_model_versions(f"name='{name}'")) == 2
    )

    moves.append("2")  # compared with v2, registered as v3; v4 is promoted during the registration
    state, best = promote_best("2")
    assert state.is_failed() and best.registered.version == "3" and best.registered.alias == CANDIDATE
    assert "v3 not promoted: cas-sweep's champion moved from v2 to v4 since v3 was compared" in state.message
    assert alias_version(name, CHAMPION) == "4"


def test_rlhf_rollback_moves_champion_only_under_the_retrain_slot(project, capsys):
    from cli.main import main

    name = "cas-rollback"
    v1 = new_version(name)
    registry.promote(name, v1, approver="auto")
    v2 = new_version(name, compared=v1)
    registry.promote(name, v2, approver="auto")
    argv = ["rollback", f"root={project.root}", "data=demo_small", f"tracking.registered_model_name={name}"]
    with RetrainSlot(project, print, on_lost=lambda: None) as retrain:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert (
            "✗ rollback refused: the retrain slot is held by" in err
            and f"pid {retrain.mine.owner.split(':')[1]}" in err
        )
        assert "Traceback" not in err and alias_version(name, CHAMPION) == v2
    assert main(argv) == 0, capsys.readouterr().err
    assert f"moved from v{v2} back to v{v1}" in capsys.readouterr().out
    assert alias_version(name, CHAMPION) == v1 and "slot generation" in registry.version_tags(name, v2)["rolled_back"]


def test_a_full_retrain_on_an_incremental_champions_data_is_not_nothing_new(project):
    """The weekly `retrain.mode=full` beside nightly incremental ones: on the data an incremental champion was trained
    on it trains from scratch; on a full champion's data and config it is "nothing new", as any retrain."""
    from dataclasses import replace

    from flows.caching import config_hash
    from flows.retrain import nothing_to_do

    name = "full-after-incremental"
    cfg = replace(project, tracking=replace(project.tracking, registered_model_name=name))
    full = replace(cfg, retrain=replace(cfg.retrain, mode="full"))
    assert config_hash(full) == config_hash(cfg)  # the mode is not the config
    v1 = new_version(name)
    registry.promote(name, v1, approver="auto")
    s = summary(cfg, None)
    registry.tag_version(name, v1, {"data_version": s.data.version, "config_hash": config_hash(cfg)})
    with mlflow.start_run():
        registry.tag_version(name, v1, {"retrain_mode": "incremental"})
        assert nothing_to_do(cfg, s.data, s).message.startswith(f"nothing new: champion v{v1}")  # auto
        assert nothing_to_do(full, s.data, s) is None
        registry.tag_version(name, v1, {"retrain_mode": "full"})
        assert nothing_to_do(full, s.data, s).message.startswith(f"nothing new: champion v{v1}")
