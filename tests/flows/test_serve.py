"""`rlhf serve`'s deployment, registered on the session's Prefect test server: cron schedule from
config, a trigger on rlhf.data.updated, one run at a time, the overrides as its parameter."""

import asyncio
import json

import pytest

from components.config import OverrideNotAllowed, compose
from flows import serve as serve_module
from flows.ingest import DATA_UPDATED, data_resource
from flows.serve import DEPLOYMENT, SERVED_OVERRIDES, allowed_overrides, deployment, retrain_service

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_deployment_has_schedule_trigger_and_concurrency_limit(tmp_path):
    overrides = [f"root={tmp_path}", "data=demo_small", "infra.retrain_cron=15 4 * * *"]
    d = deployment(compose(overrides), overrides)
    deployment_id = d.apply()

    async def read():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            dep = await client.read_deployment(deployment_id)
            automations = await client.read_automations_by_name("retrain on new data")
            return dep, automations

    dep, automations = asyncio.run(read())
    assert dep.name == DEPLOYMENT and dep.parameters == {"overrides": overrides}
    assert [s.schedule.cron for s in dep.schedules] == ["15 4 * * *"]
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert automations and DATA_UPDATED in automations[0].trigger.expect
    # only this project's data events: the resource id ingest emits for this data dir
    assert (
        automations[0].trigger.match.model_dump()["prefect.resource.id"]
        == data_resource(compose(overrides))["prefect.resource.id"]
    )
    assert automations[0].actions[0].parameters == {"overrides": overrides}


def test_no_schedule_and_no_trigger_when_configured_off(tmp_path):
    overrides = [f"root={tmp_path}", "infra.retrain_cron=null", "infra.retrain_on_new_data=false"]
    d = deployment(compose(overrides), overrides)
    assert d.schedules in (None, []) and d.triggers == []


def test_the_traces_ingest_runs_on_its_own_schedule_and_never_stalls(tmp_path, monkeypatch):
    """Issue 30: `infra.ingest_traces_cron` adds a deployment that runs `rlhf ingest --from-traces` with no parameters
    (nothing a caller of the Prefect API could change). Issue 38: one tick with signed answers judged by honest raters,
    three of which the data cannot take: votes up 4, up 4, up 4, down 1, down 1 (label 1, mean rating 2.8: the suite
    refuses it), an answer to a frozen eval prompt, a prompt over the data contract's length. The good rows land; the
    refused one is quarantined and remembered, the other two left out and counted; the next tick has nothing to do
    (it used to refuse the whole batch again on every tick)."""
    import mlflow

    from components.data.schemas import read_jsonl, shard_files
    from components.data.versioning import ensure_data
    from flows.serve import INGEST_TRACES, ingest_traces_deployment, ingest_traces_service
    from tests.registry.signed_answers import serving_desk

    overrides = [f"root={tmp_path}", "data=demo_small"]
    assert ingest_traces_deployment(compose(overrides)) is None, "off by default"
    d = ingest_traces_deployment(compose([*overrides, "infra.ingest_traces_cron=*/30 * * * *"]))
    assert d.name == INGEST_TRACES and [s.schedule.cron for s in d.schedules] == ["*/30 * * * *"]
    assert d.parameters == {} and d.concurrency_limit == 1
    monkeypatch.setenv(serve_module.SERVED_OVERRIDES, json.dumps(overrides))
    cfg = compose(overrides)
    ensure_data(cfg)
    eval_prompt = next(iter(read_jsonl(shard_files(cfg.data_path / "eval")[0], "eval").rows))[1]["prompt"]
    desk = serving_desk(cfg, ["r1", "r2", "r3", "r4", "r5"])
    good1, good2, mixed, on_eval, too_long = desk.answer(
        ["A served prompt", "Another served prompt", "A third served prompt", eval_prompt, "x" * 2500],
        ["a fine answer", "a poor answer", "a mixed answer", "an answer to an eval prompt", "an answer"],
    )
    for rater, trace_id, up, rating in [
        ("r1", good1, True, None),
        ("r2", good2, False, None),
        *[(f"r{i}", mixed, True, 4) for i in (1, 2, 3)],
        *[(f"r{i}", mixed, False, 1) for i in (4, 5)],
        ("r3", on_eval, True, None),
        ("r4", too_long, True, None),
    ]:
        got = desk.vote(rater, trace_id, up, rating)
        assert got.status == 200, got
    mlflow.flush_trace_async_logging()

    state = ingest_traces_service(return_state=True)
    assert state.is_completed(), state.message
    landed = {
        row["id"] for shard in shard_files(cfg.data_path / "feedback") for _, row in read_jsonl(shard, "feedback").rows
    }
    assert {good1, good2} <= landed and not {mixed, on_eval, too_long} & landed
    harvest = json.loads((cfg.state_path / "traces" / "harvest.json").read_text())
    assert list(harvest["refused"]) == [mixed] and harvest["refused"][mixed], harvest  # with the rules it broke
    again = ingest_traces_service(return_state=True)
    assert again.is_completed() and again.message.startswith("nothing new to ingest"), again.message
    assert "3 already in the data or refused before" in again.message, again.message
    assert "1 answer(s) to a frozen eval prompt, 1 prompt(s) over data.max_prompt_chars" in again.message


# ---- what a run of the deployment may change (issue 12) ----
SECRET_DVC = "infra.dvc_remote_url='https://dvcuser:dvc-pw@dvc.example.com/store?token=dvctok'"


def served_overrides(tmp_path):
    return [f"root={tmp_path}", "data=demo_small", "ppo.steps=2", SECRET_DVC]


def test_the_deployment_stores_the_operators_overrides_redacted(tmp_path):
    served = served_overrides(tmp_path)
    d = deployment(compose(served), served)
    shown = d.parameters["overrides"]
    assert shown[:3] == served[:3] and "dvc-pw" not in str(shown) and "dvctok" not in str(shown)
    assert shown[3] == "infra.dvc_remote_url='https://***@dvc.example.com/store?token=***'"
    assert all(t.parameters == {"overrides": shown} for t in d.triggers)
    # a run with the stored parameters composes the operator's real config
    assert allowed_overrides(served, shown, compose(served)) == served


def test_allowed_overrides_trusts_the_operator_and_checks_the_rest(tmp_path):
    served = served_overrides(tmp_path)
    local = compose(served)
    assert allowed_overrides(served, served, local) == served
    # a changed stage setting replaces the operator's; left-out operator overrides still apply
    assert allowed_overrides(served, ["ppo.steps=3", "policy=grpo"], local) == [
        *(o for o in served if not o.startswith("ppo.steps")),
        "ppo.steps=3",
        "policy=grpo",
    ]
    for bad in (
        "ppo.reward_fn=os.system",
        "model.trust_remote_code=true",
        f"root={tmp_path}/other",
        "tracking.uri=x",
        "ppo.guide.model=http://127.0.0.1:9/guide",
        "ppo/guide=rollin",
        "reward.ensemble=0",
    ):
        with pytest.raises(OverrideNotAllowed, match="infra.remote_overrides"):
            allowed_overrides(served, [*served, bad], local)


def test_a_run_cannot_switch_off_the_operators_gate_or_approval(tmp_path):
    """Issue 28, as confirmed end to end: an operator serving `gate=manual`, a run asking for `gate=default` and a
    zeroed gate. A group choice is checked as the keys it changes (gate.approval: never remote), and the gate's
    thresholds are the operator's by default; so are the registry and where the data lives."""
    served = [*served_overrides(tmp_path), "gate=manual"]
    local = compose(served)
    attack = ["gate=default", "gate.min_win_rate=0", "gate.min_reward_gain=-99", "gate.max_kl=1e9"]
    with pytest.raises(OverrideNotAllowed) as e:
        allowed_overrides(served, [*served, *attack, "gate.min_judge_gain=null"], local)
    msg = str(e.value)
    assert "gate=default: `gate` is not listed in infra.remote_overrides" in msg
    for o in (*attack[1:], "gate.min_judge_gain=null"):
        assert f"  {o}: `{o.split('=')[0]}` is not listed in infra.remote_overrides" in msg
    # a group choice: other weights, other data, other servers
    for choice in ("model=small", "data=demo", "infra=server", "tracking=server"):
        with pytest.raises(OverrideNotAllowed, match=f"{choice}: `{choice.split('=')[0]}` is not listed"):
            allowed_overrides(served, [choice], local)
    # the operator may let runs tighten a listed threshold, never loosen it, and never the approval
    opened = [*served, "infra.remote_overrides=[gate.min_win_rate,gate]"]
    assert allowed_overrides(opened, ["gate.min_win_rate=0.6"], compose(opened))[-1] == "gate.min_win_rate=0.6"
    with pytest.raises(OverrideNotAllowed, match="weaker than the operator's 0.52"):
        allowed_overrides(opened, ["gate.min_win_rate=0.1"], compose(opened))
    with pytest.raises(OverrideNotAllowed, match="`gate` has no bounds"):
        allowed_overrides(opened, ["gate=default"], compose(opened))


def test_the_allow_list_is_the_serving_configs_not_the_runs(tmp_path):
    served = [*served_overrides(tmp_path), "infra.remote_overrides=[seed]"]
    local = compose(served)
    assert allowed_overrides(served, ["seed=3"], local)[-1] == "seed=3"
    with pytest.raises(OverrideNotAllowed):  # `ppo.steps` is in the default list, not in this operator's
        allowed_overrides(served, ["ppo.steps=3"], local)
    with pytest.raises(OverrideNotAllowed, match="never overridable"):  # a run cannot widen it
        allowed_overrides(served, ["infra.remote_overrides=[*]", "model.name_or_path=x"], local)


@pytest.fixture
def no_training(monkeypatch):
    """retrain and claim_run record their calls instead of running."""
    calls = []
    monkeypatch.setattr(serve_module, "retrain", lambda cfg, return_state: calls.append(cfg) or "trained")
    monkeypatch.setattr(serve_module.lifecycle, "claim_run", lambda cfg: None)
    return calls


def test_a_run_asking_for_an_import_path_fails_before_any_training(tmp_path, monkeypatch, no_training):
    served = served_overrides(tmp_path)
    monkeypatch.setenv(SERVED_OVERRIDES, json.dumps(served))
    state = retrain_service([*served, "ppo.reward_fn=os.system"], return_state=True)
    assert state.is_failed() and no_training == []
    assert "ppo.reward_fn=os.system" in state.message and "`*_fn`" in state.message
    assert "infra.remote_overrides" in state.message


def test_a_run_with_allowed_changes_trains_on_the_operators_config(tmp_path, monkeypatch, no_training):
    served = served_overrides(tmp_path)
    monkeypatch.setenv(SERVED_OVERRIDES, json.dumps(served))
    state = retrain_service(["ppo.steps=3"], return_state=True)
    assert state.is_completed() and state.result() == "trained"
    (cfg,) = no_training
    assert (cfg.root, cfg.data.n_preferences, cfg.ppo.steps) == (str(tmp_path), 300, 3)  # data=demo_small: 300
    assert cfg.infra.dvc_remote_url == "https://dvcuser:dvc-pw@dvc.example.com/store?token=dvctok"


def test_an_ingest_event_runs_the_served_deployment_and_a_sigkilled_serve_does_not_block_it(tmp_path):
    """One served deployment's life, in `rlhf serve` processes against the session's test server:
    1. `ingest` emits rlhf.data.updated; the automation starts the deployment (the only run: no cron), with the
       operator's overrides as its parameters, and the served process runs the retrain.
    2. `rlhf serve` is SIGKILLed (with its process group) while that run is in PPO: the run stays Running on the
       server and holds the deployment's concurrency slot (limit 1); nothing on a server gives it back.
    3. The restarted `rlhf serve` ends the dead run as Crashed, which frees the slot; the next run of the
       deployment resumes PPO from its checkpoint, registers a champion on the ingested data version, and a
       service manager's SIGTERM stops the service cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    from components.config import project_overrides
    from components.data.versioning import data_version, ensure_data
    from components.registry.registry import CHAMPION, alias_version
    from components.tracking import tracking_uri
    from flows.ingest import ingest_flow
    from tests.conftest import FAST_STAGES, OPEN_GATE, make_project

    root = tmp_path / "proj"
    overrides = [
        f"root={root}",
        "data=demo_small",
        *FAST_STAGES,
        "ppo.steps=8",  # killed at its first checkpoint: 7 iterations (~1 s each) still to go
        "ppo.save_every=1",
        "infra.retrain_cron=null",
        f"infra.prefect_api_url={PREFECT_API_URL.value()}",
        *OPEN_GATE,
    ]
    project = make_project(root, *overrides[1:], "tracking.registered_model_name=served-test")
    # the project's own file (issue 39): the served deployment's runs compose it too, so they register under its name
    (root / "rlhf.yaml").write_text("tracking:\n  registered_model_name: served-test\n")
    served = [*project_overrides(root), *overrides]  # what `rlhf serve` composes and serves: the file first
    ensure_data(project)  # `rlhf data`: the demo data, versioned
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}

    def serve(log_path: Path) -> subprocess.Popen:
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("rlhf")), "serve", *overrides],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "TQDM_DISABLE": "1"},
                start_new_session=True,
            )
        deadline = time.time() + 240
        while "waiting for scheduled or triggered runs" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        return proc

    log1, log2 = tmp_path / "serve1.log", tmp_path / "serve2.log"
    first = serve(log1)
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"retrain-service/{DEPLOYMENT}")
            assert dep.parameters == {"overrides": served}
            deadline = time.time() + 60
            while not client.read_automations_by_name("retrain on new data"):
                assert time.time() < deadline, log1.read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(3)  # let the server's trigger service load the new automation

            batch = tmp_path / "batch.jsonl"
            batch.write_text(
                "".join(
                    json.dumps(
                        {
                            "id": f"served-{i}",
                            "prompt": f"A served prompt {i}",
                            "chosen": f"a lovely answer {i}",
                            "rejected": f"a bad answer {i}",
                        }
                    )
                    + "\n"
                    for i in range(5)
                )
            )
            assert ingest_flow(project, str(batch), "preferences", return_state=True).is_completed()
            version = data_version(root)

            stages = root / ".rlhf" / "stages"
            deadline = time.time() + 400
            while not list(stages.glob("ppo-*/checkpoints/step-*")):  # the triggered run is well into PPO
                assert first.poll() is None and time.time() < deadline, log1.read_text()[-3000:]
                time.sleep(0.2)
            os.killpg(first.pid, signal.SIGKILL)  # the service and the run it was executing
            first.wait()
            (run,) = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            assert run.parameters == {"overrides": served}  # the event was the only thing that started it
            assert client.read_flow_run(run.id).state.is_running(), "a SIGKILLed run stays Running on the server"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)

    second = serve(log2)
    try:
        assert "Running -> Crashed" in log2.read_text()
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run.id).state.name == "Crashed"
            # issue 38, the attack as confirmed end to end: a run of the served deployment asking for a guide served
            # from a host of the caller's. It is refused before anything runs: nothing is loaded, nothing is sent
            import socket
            import threading

            listener = socket.create_server(("127.0.0.1", 0))
            listener.settimeout(0.2)
            connections, stop = [], threading.Event()

            def accept():
                while not stop.is_set():
                    try:
                        connections.append(listener.accept()[0])
                    except OSError:
                        pass

            threading.Thread(target=accept, daemon=True).start()
            port = listener.getsockname()[1]
            guide = [f"ppo.guide.model=http://127.0.0.1:{port}/guide", "ppo.guide.rollin_prob=0.5"]
            attack = client.create_flow_run_from_deployment(dep.id, parameters={"overrides": [*overrides, *guide]})
            deadline = time.time() + 120
            while not (attacked := client.read_flow_run(attack.id)).state.is_final():
                assert second.poll() is None and time.time() < deadline, log2.read_text()[-3000:]
                time.sleep(0.5)
            stop.set()
            listener.close()
            assert attacked.state.is_failed() and "`ppo.guide.model` matches `ppo.guide*`" in attacked.state.message
            assert connections == [], "the guide's host was contacted"
            again = client.create_flow_run_from_deployment(dep.id)
            deadline = time.time() + 600
            while not (done := client.read_flow_run(again.id)).state.is_final():
                assert second.poll() is None and time.time() < deadline, log2.read_text()[-3000:]
                time.sleep(1)
            assert done.state.is_completed(), f"{done.state.message}\n" + log2.read_text()[-3000:]
        second.send_signal(signal.SIGTERM)  # as a service manager stops it: a clean exit
        assert second.wait(timeout=10) == 0, log2.read_text()[-3000:]
        assert "stopped serving" in log2.read_text()
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)

    mlflow.set_tracking_uri(tracking_uri(project))
    assert alias_version("served-test", CHAMPION) == "1"
    assert mlflow.MlflowClient().get_model_version("served-test", "1").tags["data_version"] == version
    ppo_runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'ppo'", output_format="list")
    assert max(r.data.metrics.get("ppo/resumed_from_iteration", 0) for r in ppo_runs) > 0, "PPO resumed its checkpoint"
    assert not [
        r for r in mlflow.search_runs(search_all_experiments=True, output_format="list") if r.info.status == "RUNNING"
    ]


@pytest.fixture(scope="module")
def quiet_project(tmp_path_factory):
    """One project for the stop tests (its temporary Prefect server migrates its database once)."""
    from tests.conftest import make_project

    root = tmp_path_factory.mktemp("serve-stop") / "proj"
    make_project(root)
    return root


@pytest.mark.parametrize("sig, server", [("SIGINT", "temporary")])
def test_serve_stops_within_10s_on_sigterm_and_sigint(quiet_project, tmp_path, server, sig):
    """A service manager's stop (SIGTERM) or Ctrl-C (SIGINT): exit 0 within 10 s, schedule paused. Prefect's
    own SIGTERM handling had `rlhf serve` run on after SIGTERM (issue 10). Each signal once, each kind of Prefect
    server once: SIGTERM on the shared server ends the deployment test above; here Ctrl-C on `rlhf serve`'s own
    temporary server. The signal handling does not depend on the server (all four pairs measured the same)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    overrides = [f"root={quiet_project}", "data=demo_small", "infra.retrain_cron=0 3 * * *"]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    if server == "shared":
        overrides.append(f"infra.prefect_api_url={PREFECT_API_URL.value()}")
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("rlhf")), "serve", *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 240
        while "waiting for scheduled or triggered runs" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(1)  # the runner is polling
        sent = time.time()
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=10)
        took = time.time() - sent
        assert code == 0, log_path.read_text()[-3000:]
        assert "stopped serving" in log_path.read_text() and "paused" in log_path.read_text()
        print(f"{server} server, {sig}: exited in {took:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_canary_is_decided_on_its_interval_only_with_promotion_canary(tmp_path):
    """`rlhf serve` adds the canary check (flows/canary.py) with registry.promotion=canary: every check_every_s, no
    parameters a caller of the Prefect API could change, one at a time; a promotion mode that is not one is refused."""
    from components.config import ConfigError
    from flows.serve import CANARY_CHECK, canary_check_deployment

    overrides = [f"root={tmp_path}"]
    assert canary_check_deployment(compose(overrides)) is None, "direct promotion: no canary to decide"
    d = canary_check_deployment(compose([*overrides, "registry.promotion=canary", "registry.canary.check_every_s=60"]))
    assert d.name == CANARY_CHECK and d.parameters == {} and d.concurrency_limit == 1
    assert [s.schedule.interval.total_seconds() for s in d.schedules] == [60.0]
    with pytest.raises(ConfigError, match="registry.promotion must be direct or canary"):
        compose([*overrides, "registry.promotion=sideways"])
