"""`rlhf` commands of the service: run, sweep, serve, status, approve, rollback, model serve."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cli.commands import _load, _prefect_server, _where, check_servers


def _sigterm_unwinds() -> None:
    """SIGTERM (a service manager's stop) unwinds like Ctrl-C instead of killing the process outright: the
    flow run ends as Crashed, the retrain slot and MLflow runs are released, and the exit code is 143."""
    import signal

    from prefect.exceptions import TerminationSignal

    def handler(signum, frame):
        raise TerminationSignal(signal=signum)

    signal.signal(signal.SIGTERM, handler)


def cmd_run(args, overrides: list[str]) -> int:
    cfg = _load(overrides)
    from flows.retrain import retrain

    _sigterm_unwinds()

    state = retrain(cfg, return_state=True)
    if state.is_failed():
        print(f"\n✗ retrain failed: {state.message}", file=sys.stderr)
        print(f"  {_where(cfg)}", file=sys.stderr)
        return 1
    s = state.result()
    print(
        f"\n✓ retrain run {s.run_id}: data version {s.data.version} ({s.data.origin}; {s.changed}), "
        f"validated {sum(s.validation.rows.values())} rows, 0 problems"
    )
    if s.validation.docs_index:
        print(f"  Data Docs: {s.validation.docs_index}")
    if s.nothing_new or s.held_by_rollback:
        print(f"  {state.message}: no stage ran, the registry is unchanged")
        print(f"  {_where(cfg)}")
        return 0
    print(f"  {s.mode} retrain: {s.mode_reason}")
    if s.cached:
        print(f"  reused from earlier runs (unchanged inputs, Prefect cache): {', '.join(s.cached)}")
    m = s.policy.metrics
    for ns, name in (
        ("ppo", "PPO"),
        ("rs", "rejection sampling"),
        ("grpo", "GRPO"),
        ("rloo", "RLOO"),
        ("dpo", "DPO"),
        ("kto", "KTO"),
    ):
        if f"{ns}/eval_reward" in m:
            print(
                f"  {name} on {int(m[f'{ns}/eval_prompts'])} held-out prompts: reward {m[f'{ns}/eval_reward']:+.2f} "
                f"(SFT {m[f'{ns}/eval_reward_ref']:+.2f}), KL to SFT {m[f'{ns}/eval_kl']:.2f}"
            )
    print(f"  policy adapter: {s.policy.dir}\n  SFT model: {s.sft.dir}\n  reward model: {s.reward.dir}")
    print("\n" + s.gate.summary)
    if reg := s.registered:
        print(
            f"\n✓ registered {reg.name} version {reg.version}, alias {reg.alias}"
            + (f" (previous champion v{reg.previous_champion})" if reg.previous_champion else "")
        )
        if reg.alias == "champion":
            print(f"  serve it: rlhf model serve --alias {reg.alias}   (then curl: it prints the command)")
        else:
            print(f"  {state.message}")
    else:
        print(f"\n✗ not promoted because {'; '.join(s.gate.reasons)} (the registry is unchanged)")
    print(f"  {_where(cfg)}")
    return 0


def cmd_sweep(args, overrides: list[str]) -> int:
    """`rlhf sweep`: PPO variants side by side (flows/sweep.py); Hydra sweep syntax (`a=1,2`) multiplies out."""
    from components.config import project_overrides, project_root
    from flows.sweep import expand

    project = project_overrides(project_root(overrides))  # each variant composes over the project's own file
    try:
        variants = [[*project, *v] for v in expand(overrides)]
    except Exception as e:  # hydra's OverrideParseException: say which override and how sweeps are written
        from components.config import ConfigError

        raise ConfigError(
            f"{e}\n  (a sweep override lists its values: ppo/guide=none,rollin ppo.target_kl=4,6)"
        ) from None
    base = [o for o in overrides if o in variants[0] and all(o in v for v in variants)]
    cfg = _load(base)
    from components.config import ConfigError, compose
    from components.training import guided
    from components.training.ppo import kl_controller

    for v in variants:  # every variant composes, and its PPO settings hold, before anything trains
        try:
            ppo = compose(v).ppo
            guided.check_config(ppo)
            kl_controller(ppo)
        except ValueError as e:
            raise ConfigError(f"variant {' '.join(v)}: {e}") from None
    from flows.sweep import sweep

    _sigterm_unwinds()
    print(f"sweep of {len(variants)} variant(s) on the same data, SFT and reward model:")
    for v in variants:
        print("  " + " ".join(o for o in v if o not in base and o not in project))
    state = sweep(cfg, variants, promote_best=args.promote_best, return_state=True)
    summary = state.result(raise_on_failure=False)
    if hasattr(summary, "table"):
        print(f"\nsweep run {summary.run_id} (data version {summary.data_version}):\n")
        print(summary.table())
        print("  the same table: artifact sweep_results.md of that run; one run per variant (`sweep <variant>`),")
        print("  their policy curves in each variant's policy child run. Compare them: select the runs, Compare.")
        if args.promote_best:
            print(f"\npromote best: {summary.best_why}")
            if (reg := summary.registered) and not state.is_failed():  # a refusal is said once, below
                print(f"{'✓' if reg.alias == 'champion' else '…'} {state.message}")
    if state.is_failed():
        print(f"\n✗ sweep: {state.message}", file=sys.stderr)
        print(f"  {_where(cfg)}", file=sys.stderr)
        return 1
    print(f"  {_where(cfg)}")
    return 0


def cmd_model(args, overrides: list[str]) -> int:
    """`rlhf model serve`: MLflow's scoring server for a registered version, as `mlflow models serve --env-manager
    local` runs it (uvicorn, one worker), behind the request-body cap of service/serving.py; the venv's bin on PATH
    and the project's tracking URI; prints the URL and a curl example."""
    cfg = _load(overrides, prefect=False)
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    from components import tracking

    name, venv = cfg.tracking.registered_model_name, Path(sys.executable).parent
    uri = f"models:/{name}@{args.alias}" if not args.alias.isdigit() else f"models:/{name}/{args.alias}"
    tracing = {}
    if cfg.registry.trace_requests:  # where the served model records its answers (components/registry/policy_model.py)
        from components.registry import registry

        experiment_id = tracking.serving_experiment(cfg)  # the served answers' own experiment: traces, canaries
        version = args.alias if args.alias.isdigit() else registry.alias_version(name, args.alias)
        from service import keys, raters

        ring = keys.load(cfg)  # the key its answers and votes are signed with (made on first use: local profile)
        tracing = {
            "RLHF_TRACE_EXPERIMENT_ID": experiment_id,
            "RLHF_SERVED_MODEL": f"{name}/{version}@{args.alias}",
            keys.KEYS_ENV: str(ring.path),
            "RLHF_RATERS_FILE": str(raters.raters_path(cfg)),
            "RLHF_RATING_RANGE": f"{cfg.data.min_rating}:{cfg.data.max_rating}",
        }
    canary = cfg.registry.canary
    share = canary.share if args.share is None else args.share
    if not 0 <= share <= 1:
        print(f"✗ --share must be in 0..1 (the share of users the challenger answers), got {share}", file=sys.stderr)
        return 2
    shadow = canary.shadow or args.shadow
    challenger = "" if args.challenger == args.alias or args.alias.isdigit() else args.challenger
    arms = {  # service/arms.py: the champion and, during a canary, the challenger, re-read every poll_s
        "RLHF_MODEL_NAME": name,
        "RLHF_CHAMPION_ALIAS": args.alias,
        "RLHF_CHALLENGER_ALIAS": challenger,
        "RLHF_CANARY_SHARE": str(share),
        "RLHF_CANARY_SHADOW": "1" if shadow else "0",
        "RLHF_ALIAS_POLL_S": str(canary.poll_s),
    }
    env = {
        **os.environ,
        **arms,
        "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg),
        "__pyfunc_model_path__": uri,  # scoring_server._SERVER_MODEL_PATH: what service/serving.py loads
        MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name: str(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
        **tracing,
    }
    print(f"serving {uri} on http://{args.host}:{args.port}/invocations  (Ctrl-C stops)")
    if challenger:
        how = "answers every prompt in shadow (never shown)" if shadow else f"answers {share:.0%} of users (sticky)"
        print(
            f"  canary: while a version has the alias {challenger!r}, it {how}; the aliases are re-read every "
            f"{canary.poll_s:g} s (`rlhf canary status` says how it goes)"
        )
    if tracing:
        print(
            f"  each answer is an MLflow trace in experiment {cfg.tracking.experiment + tracking.SERVING_SUFFIX!r}, signed (its id in `trace_id`; "
            "registry.trace_requests=false turns it off); a rater judges one with POST /feedback or "
            "`rlhf feedback TRACE_ID up|down --token T` (tokens: `rlhf raters add NAME`)"
        )
        print(f"  the traces in the MLflow UI: {tracking.ui_command(cfg, serving=True)}")
    print(
        f"  try: curl -s {args.host}:{args.port}/invocations -H 'Content-Type: application/json' "
        '-d \'{"inputs": ["The film was"], "params": {"max_new_tokens": 24, "temperature": 0.7, "seed": 0}}\'',
        flush=True,
    )
    uvicorn = str(venv / "uvicorn")
    os.execvpe(uvicorn, [uvicorn, "--host", args.host, "--port", str(args.port), "service.serving:app"], env)


def cmd_canary(args, overrides: list[str]) -> int:
    """`rlhf canary status | check | start VERSION | stop`: the canary of flows/canary.py. `start` gives VERSION the
    alias `challenger` (a serving process starts its canary at its next poll); `stop` retires it now; `check` decides
    and acts once (`rlhf serve` runs it on a schedule); `status` only prints."""
    cfg = _load(overrides, prefect=args.action == "check")
    from components import tracking
    from components.registry import canary as observed
    from components.registry import registry
    from flows.canary import canary_check, status

    tracking.setup(cfg)
    name = cfg.tracking.registered_model_name
    if args.action == "start":
        if not args.version or not args.version.isdigit():
            print("usage: rlhf canary start VERSION (a registered version number)", file=sys.stderr)
            return 2
        champion = registry.alias_version(name, registry.CHAMPION)
        if champion is None or champion == args.version:
            print(
                f"✗ v{args.version} cannot be a challenger: the champion is {f'v{champion}' if champion else 'none'}"
                "; promote a first champion with `rlhf run`",
                file=sys.stderr,
            )
            return 1
        from mlflow.exceptions import MlflowException

        try:
            observed.start(name, args.version, shadow_first=cfg.registry.canary.shadow_answers > 0)
        except MlflowException:
            print(f"✗ {name} has no version {args.version}: see the registry in the MLflow UI", file=sys.stderr)
            return 1
        print(f"✓ {name} v{args.version} is the challenger against champion v{champion}")
        print(
            "  a running `rlhf model serve` routes its share of users to it at its next alias poll; "
            "`rlhf canary status` shows how it goes"
        )
        return 0
    s = status(cfg)
    if s is None:
        print(
            f"no canary: no version of {name} other than the champion has the alias {registry.CHALLENGER!r} "
            "(`rlhf canary start VERSION` starts one)"
        )
        return 0
    if args.action == "stop":
        from flows.canary import retire

        s.guard.failures.clear()
        s.decision = replace_reason(s.decision, "retired by the operator (`rlhf canary stop`)")
        retire(s)
        print(
            f"✓ v{s.challenger} retired: the champion v{s.champion} keeps all traffic at the serving process's next poll"
        )
        return 0
    if args.action == "status":
        print(s.table())
        print(f"  the served answers and canary runs: MLflow UI {tracking.ui_command(cfg, serving=True)}")
        return 0
    checked = canary_check(cfg)
    print(checked.table() if checked else "no canary")
    if checked is not None:
        print(f"  {checked.outcome}")
    print(f"  {_where(cfg)}")
    return 0


def replace_reason(decision, reason: str):
    from dataclasses import replace

    return replace(decision, verdict="retire", reason=reason)


def cmd_rollback(args, overrides: list[str]) -> int:
    """Move `champion` back, holding the retrain slot (so that no promotion interleaves) under its fence. A live
    retrain holding the slot refuses it at once: its own promotion, compared with the champion of now, would be
    refused after a rollback anyway."""
    cfg = _load(overrides)
    from components import tracking
    from components.registry import registry
    from service.slot import RetrainSlot, SlotBusy, SlotLost

    tracking.setup(cfg)
    name = cfg.tracking.registered_model_name
    slot = RetrainSlot(cfg, lambda line: print(f"  {line}", file=sys.stderr), on_lost=lambda: None)
    try:
        slot.acquire(wait_s=0)
    except SlotBusy as e:
        print(
            f"✗ rollback refused: {e}, and `{registry.CHAMPION}` moves only under that slot; run `rlhf rollback` again "
            "once that run has ended (stop it with Ctrl-C or SIGTERM, or `rlhf approve ID --reject` if it waits for "
            "approval)",
            file=sys.stderr,
        )
        return 1
    try:
        current, previous = registry.rollback(name, by=args.by, reason=args.reason, fence=slot.fence)
    except (ValueError, SlotLost, registry.ChampionMoved) as e:
        print(f"✗ rollback: {e}; `{registry.CHAMPION}` was not moved", file=sys.stderr)
        return 1
    finally:
        slot.release()
    print(f"✓ {name}: alias {registry.CHAMPION} moved from v{current} back to v{previous}")
    print(
        f"  v{current} is tagged {registry.ROLLED_BACK}: a retrain on its data version and config will not promote it "
        "again (new data or a changed config will)"
    )
    print(
        f"  a running `rlhf model serve` answers with v{previous} within registry.canary.poll_s "
        f"({cfg.registry.canary.poll_s:g} s), no restart"
    )
    print(f"  {_where(cfg)}")
    return 0


def cmd_approve(args, overrides: list[str], positional: list[str]) -> int:
    """Answer a retrain paused for approval (gate.approval=manual), then say what it did. The retrain, which holds
    the retrain slot, moves `champion` itself, under its fence and only if `champion` has not moved since its gate
    (flows/retrain.promote): a refusal is its one sentence here, and the exit code 1."""
    from uuid import UUID

    if len(positional) != 1:
        print("usage: rlhf approve FLOW_RUN_ID [--reject] [--approver NAME] [--comment TEXT]", file=sys.stderr)
        return 2
    # the environment (Prefect home / API URL) first: Prefect reads its settings when first imported
    cfg = _load(overrides)
    from prefect.exceptions import NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    try:
        run_id = UUID(positional[0])
        resume_flow_run(
            run_id, run_input={"approve": not args.reject, "approver": args.approver, "comment": args.comment}
        )
    except (ValueError, ObjectNotFound):
        print(
            f"✗ no flow run {positional[0]} on the Prefect server {_prefect_server(cfg)}: check the id "
            "(the retrain's log names it) and infra.prefect_api_url",
            file=sys.stderr,
        )
        return 1
    except NotPausedError:
        state = _outcome(run_id, 0)
        print(
            f"✗ flow run {positional[0]} is not waiting for approval (it is {state.name if state else 'unknown'}"
            + (f": {state.message.splitlines()[0]}" if state and state.message else "")
            + "); nothing was answered",
            file=sys.stderr,
        )
        return 1
    answered = f"flow run {positional[0]}: {'rejected' if args.reject else 'approved'} by {args.approver}"
    state = _outcome(run_id, APPROVE_OUTCOME_WAIT_S)
    if state is None or not state.is_final():
        print(f"✓ {answered}; the run goes on ({state.name if state else 'unknown'}): `rlhf status` shows its outcome")
        return 0
    message = (state.message or state.name).splitlines()[0]
    if state.is_failed() or state.is_crashed():
        print(f"✗ {answered}, but the retrain ended {state.name}: {message}", file=sys.stderr)
        return 1
    print(f"✓ {answered}; the retrain: {message}")
    return 0


APPROVE_OUTCOME_WAIT_S = 60.0  # a resumed retrain notices within its pause's poll (5 s), then promotes in seconds


def _outcome(run_id, wait_s: float):
    """The flow run's state once it is final, or as it is after `wait_s` (None: unreadable)."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                state = client.read_flow_run(run_id).state
            except Exception:  # noqa: BLE001 - the answer went through; only its outcome is unknown
                return None
            if state is None or state.is_final() or time.monotonic() >= deadline:
                return state
            time.sleep(1.0)


def cmd_status(args, overrides: list[str]) -> int:
    """Who holds the retrain slot (and whether it is alive), and the last runs with their outcomes."""
    cfg = _load(overrides)
    from components import tracking
    from service.status import status_lines

    tracking.setup(cfg)
    print(f"project {cfg.root_path}, Prefect server {_prefect_server(cfg)}")
    print("\n".join(status_lines(cfg)))
    print(f"  {_where(cfg)}")
    return 0


def cmd_serve(args, overrides: list[str]) -> int:
    cfg = _load(overrides)
    from flows.serve import DEPLOYMENT, INGEST_TRACES, serve

    print(
        f"serving deployment retrain-service/{DEPLOYMENT}: schedule {cfg.infra.retrain_cron or 'none'}, "
        f"{'retrain on every rlhf.data.updated event for ' + str(cfg.data_path) if cfg.infra.retrain_on_new_data else 'no event trigger'}, "
        "one run at a time (Ctrl-C or SIGTERM stops)"
    )
    if cfg.infra.ingest_traces_cron:
        print(
            f"  and ingest-traces-service/{INGEST_TRACES}: the judged served answers into the data, schedule "
            f"{cfg.infra.ingest_traces_cron}"
        )
    if cfg.infra.prefect_api_url:
        print(f"  Prefect server: {_prefect_server(cfg)} (runs, schedule and automation in its UI)")
    else:
        print(
            "  no shared Prefect server configured: this process starts a temporary one, so events from `rlhf "
            "ingest` in other processes do not reach it.\n  For the event trigger run `prefect server start` and "
            "pass infra.prefect_api_url=http://127.0.0.1:4200/api to both commands."
        )
    serve(cfg, cfg.overrides)  # the project's rlhf.yaml first: every served run composes what this one did
    print(f"stopped serving retrain-service/{DEPLOYMENT} (its schedule is paused until the next `rlhf serve`)")
    print(f"  {_where(cfg)}")
    return 0


def cmd_services(args, overrides: list[str]) -> int:
    """`rlhf services up|down|status`: PostgreSQL, MLflow (auth) and Prefect (auth) on this machine."""
    from service import servers as services

    layout = services.Layout(Path(args.dir).expanduser().resolve())
    if args.action == "up":
        ports = services.Ports(args.postgres_port, args.mlflow_port, args.prefect_port)
        print(f"starting PostgreSQL, MLflow and Prefect servers in {layout.root} (first start: ~30 s)", flush=True)
        try:
            env = services.up(layout, ports)
        except services.ServiceError as e:
            print(f"✗ {e}", file=sys.stderr)
            return 1
        print(
            f"✓ MLflow {env['MLFLOW_TRACKING_URI']} (basic auth), Prefect {env['PREFECT_API_URL']} (auth), "
            f"PostgreSQL 127.0.0.1:{ports.postgres}"
        )
        print(f"  credentials (mode 600, never in conf/): {layout.credentials}")
        print(f"  point clients at them:  export $(cat {layout.endpoints})")
        print("  then: rlhf worker --pool gpu   and   rlhf run infra=server tracking=server")
        return 0
    if args.action == "down":
        stopped = services.down(layout)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'} (data kept in {layout.root})")
        return 0
    report = services.status(layout)
    if not report:
        print(f"no services in {layout.root}: start them with `rlhf services up --dir {layout.root}`")
        return 1
    for name, line in report.items():
        print(f"{name:9} {line}")
    return 0 if all(("healthy" in v or "running" in v) for v in report.values()) else 1


def cmd_deploy(args, overrides: list[str]) -> int:
    """`rlhf deploy [--pool gpu]`: the work pool and the stage deployments the retrain dispatches to."""
    cfg = _load(overrides)
    pool = args.pool or cfg.infra.training_pool or "gpu"
    from flows.pool import deploy

    names = deploy(pool)
    print(f"✓ work pool {pool!r}: deployments {', '.join(names)} on Prefect {_prefect_server(cfg)}")
    print(f"  start a worker on each training machine: rlhf worker --pool {pool}")
    return 0


def cmd_worker(args, overrides: list[str]) -> int:
    """`rlhf worker [--pool gpu] [--dir D]`: deploy the stages, then become a Prefect process worker."""
    cfg = _load(overrides, prefect=False)
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "✗ rlhf worker needs a shared Prefect server: set PREFECT_API_URL (or infra=server); "
            "`rlhf services up` starts one on this machine",
            file=sys.stderr,
        )
        return 2
    check_servers(cfg)
    pool = args.pool or cfg.infra.training_pool or "gpu"
    from flows.pool import deploy, worker_argv

    work_dir = Path(args.dir or ".").expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    deploy(pool)
    os.environ["RLHF_WORKER_DIR"] = str(work_dir)
    # a dispatched stage waits for the next poll: Prefect's default is every 10 s
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(args.poll_s))
    argv = worker_argv(pool, args.name, args.limit)
    print(
        f"worker for pool {pool!r} on Prefect {os.environ['PREFECT_API_URL']}: stages run with state in "
        f"{work_dir / cfg.infra.state_dir} (at most {args.limit} at a time); Ctrl-C or SIGTERM stops it",
        flush=True,
    )
    os.chdir(work_dir)
    from service.worker import supervise

    return supervise(argv, lambda m: print(m, flush=True))  # Prefect's worker, stopped within 10 s when asked
