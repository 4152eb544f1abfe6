"""The `rlhf` command. Every subcommand accepts Hydra overrides: `rlhf run model=tiny ppo.steps=20`.

    rlhf run       [overrides]                          the pipeline on the configured data
    rlhf validate  [PATH] [--kind K] [overrides]        Great Expectations checks, readable report
    rlhf ingest    FILE --kind K [--quarantine] [...]   validate + version a new batch, emit rlhf.data.updated
    rlhf data      [overrides]                          materialise data/ (dvc pull, else the demo) and show its version
    rlhf config    [--options] [overrides]              print the resolved config (or every group's options)
    rlhf status    [overrides]                          who holds the retrain slot; the last runs and outcomes
    rlhf model serve [--alias champion] [--port 5001]   serve a registered version (MLflow scoring server)

Exit codes: 0 ok, 1 refused or failed (the message says why), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from components.config import Config, ConfigError, compose, group_options, to_yaml


def _split(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides (key=value, +key=value, ~key) vs plain positional arguments."""
    overrides, positional = [], []
    for t in tokens:
        is_override = ("=" in t or t.startswith("~")) and not Path(t).exists()
        (overrides if is_override else positional).append(t)
    return overrides, positional


def _load(overrides: list[str], prefect: bool = True) -> Config:
    """The config, and the process environment set from it (before Prefect is imported)."""
    cfg = compose(overrides)
    from flows.env import configure_environment, temporary_server_notice

    configure_environment(cfg)
    if prefect and (notice := temporary_server_notice(cfg)):
        print(notice, file=sys.stderr)
    return cfg


def _prefect_server(cfg: Config) -> str:
    return cfg.infra.prefect_api_url or os.environ.get("PREFECT_API_URL") or "(a temporary one of this command)"


def _where(cfg: Config) -> str:
    from components import tracking

    return f"MLflow UI: {tracking.ui_command(cfg)}   (then open http://127.0.0.1:5000)"


# ----------------------------------------------------------------------------------------
def cmd_config(args, overrides: list[str]) -> int:
    if args.options:
        for group, options in group_options().items():
            print(f"{group}: {', '.join(o for o in options if o != 'schema')}")
        return 0
    print(to_yaml(compose(overrides)), end="")
    return 0


def cmd_data(args, overrides: list[str]) -> int:
    from components.data.versioning import ensure_data

    cfg = _load(overrides, prefect=False)
    state = ensure_data(cfg)
    print(f"✓ data version {state.version} ({state.origin}) in {cfg.data_path}")
    print("  rows: " + ", ".join(f"{k}={v}" for k, v in state.rows.items()))
    print(f"  DVC remote: {state.remote}   (dvc status: clean)")
    return 0


def cmd_validate(args, overrides: list[str], positional: list[str]) -> int:
    from components.data.schemas import KINDS, infer_kind
    from components.data.validation import validate_batch, validate_dataset

    if len(positional) > 1:
        raise SystemExit(f"rlhf validate: expected at most one PATH, got {positional}")
    cfg = _load(overrides, prefect=False)
    path = Path(positional[0]).expanduser().resolve() if positional else cfg.data_path
    gx_root = cfg.state_path / "gx"
    if path.is_dir():
        kinds = [args.kind] if args.kind else [k for k in KINDS if (path / k).is_dir()] or list(KINDS)
        if path.name in KINDS and not args.kind:  # a folder of shards of one kind
            path, kinds = path.parent, [path.name]
        report = validate_dataset(path, cfg.data, gx_root, kinds)
        title = f"{path} ({', '.join(kinds)})"
    else:
        kind = args.kind or infer_kind(path)
        if kind is None:
            print(f"✗ {path}: cannot tell the data kind; pass --kind {{{','.join(KINDS)}}}", file=sys.stderr)
            return 2
        inside = path.is_relative_to(cfg.data_path)
        report, _ = validate_batch(path, kind, cfg.data, gx_root, None if inside else cfg.data_path)
        title = f"{path} ({kind}{'' if args.kind else ', inferred'}{'' if inside else ', checked against ' + str(cfg.data_path)})"
    print(report.format(title, cfg.data.report_max_examples))
    if report.docs_index:
        print(f"  Data Docs: {report.docs_index}")
    return 0 if report.ok else 1


def cmd_ingest(args, overrides: list[str], positional: list[str]) -> int:
    if len(positional) != 1:
        raise SystemExit("rlhf ingest: expected exactly one FILE")
    cfg = _load(overrides)
    from flows.ingest import ingest_flow

    state = ingest_flow(cfg, str(Path(positional[0]).resolve()), args.kind, args.quarantine, return_state=True)
    if state.is_failed():
        print(f"\n{state.result(raise_on_failure=False)}", file=sys.stderr)
        print("  data/ and data.dvc are unchanged.", file=sys.stderr)
        return 1
    r = state.result()
    print(
        f"\n{'✓' if r.n_good else '✗'} ingest of {r.source} ({r.kind}): {r.n_good} row(s) ingested, {r.n_bad} quarantined"
    )
    if r.shard:
        print(f"  new shard: {r.shard}")
        print(f"  data version: {r.version_before} -> {r.version_after}  (commit data.dvc to record it in git)")
        print("  event: rlhf.data.updated emitted (triggers the retrain deployment when `rlhf serve` runs)")
    if r.quarantine:
        print(f"  quarantined rows with reasons: {r.quarantine}")
    if r.docs_index:
        print(f"  Data Docs: {r.docs_index}")
    return 0 if r.n_good else 1


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
    if s.cached:
        print(f"  reused from earlier runs (unchanged inputs, Prefect cache): {', '.join(s.cached)}")
    m = s.policy.metrics
    if "ppo/eval_reward" in m:
        print(
            f"  PPO on {int(m['ppo/eval_prompts'])} held-out prompts: reward {m['ppo/eval_reward']:+.2f} "
            f"(SFT {m['ppo/eval_reward_ref']:+.2f}), KL to SFT {m['ppo/eval_kl']:.2f}"
        )
    print(f"  policy adapter: {s.policy.dir}\n  SFT model: {s.sft.dir}\n  reward model: {s.reward.dir}")
    print("\n" + s.gate.summary)
    if reg := s.registered:
        print(
            f"\n✓ registered {reg.name} version {reg.version}, alias {reg.alias}"
            + (f" (previous champion v{reg.previous_champion})" if reg.previous_champion else "")
        )
        print(f"  serve it: rlhf model serve --alias {reg.alias}   (then curl: it prints the command)")
    else:
        print(f"\n✗ not promoted because {'; '.join(s.gate.reasons)} (the registry is unchanged)")
    print(f"  {_where(cfg)}")
    return 0


def cmd_model(args, overrides: list[str]) -> int:
    """`rlhf model serve`: `mlflow models serve` of a registered version, with the venv's bin on PATH
    (MLflow execs uvicorn from PATH) and the project's tracking URI; prints the URL and a curl example."""
    cfg = _load(overrides, prefect=False)
    from components import tracking

    name, venv = cfg.tracking.registered_model_name, Path(sys.executable).parent
    uri = f"models:/{name}@{args.alias}" if not args.alias.isdigit() else f"models:/{name}/{args.alias}"
    env = {
        **os.environ,
        "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg),
    }
    print(f"serving {uri} on http://{args.host}:{args.port}/invocations  (Ctrl-C stops)")
    print(
        f"  try: curl -s {args.host}:{args.port}/invocations -H 'Content-Type: application/json' "
        '-d \'{"inputs": ["The film was"], "params": {"max_new_tokens": 24, "temperature": 0.7, "seed": 0}}\'',
        flush=True,
    )
    os.execvpe(
        str(venv / "mlflow"),
        [
            str(venv / "mlflow"),
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "-h",
            args.host,
            "-p",
            str(args.port),
        ],
        env,
    )


def cmd_rollback(args, overrides: list[str]) -> int:
    cfg = _load(overrides, prefect=False)
    from components import tracking
    from components.registry import registry

    tracking.setup(cfg)
    name = cfg.tracking.registered_model_name
    try:
        current, previous = registry.rollback(name, by=args.by, reason=args.reason)
    except ValueError as e:
        print(f"✗ rollback: {e}", file=sys.stderr)
        return 1
    print(f"✓ {name}: alias {registry.CHAMPION} moved from v{current} back to v{previous}")
    print(
        f"  v{current} is tagged {registry.ROLLED_BACK}: a retrain on its data version and config will not promote it "
        "again (new data or a changed config will)"
    )
    print(f"  a running `mlflow models serve -m models:/{name}@{registry.CHAMPION}` picks it up on restart")
    print(f"  {_where(cfg)}")
    return 0


def cmd_approve(args, overrides: list[str], positional: list[str]) -> int:
    """Answer a retrain paused for approval (gate.approval=manual)."""
    from uuid import UUID

    if len(positional) != 1:
        print("usage: rlhf approve FLOW_RUN_ID [--reject] [--approver NAME] [--comment TEXT]", file=sys.stderr)
        return 2
    # the environment (Prefect home / API URL) first: Prefect reads its settings when first imported
    cfg = _load(overrides)
    from prefect.exceptions import ObjectNotFound
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
    print(f"✓ flow run {positional[0]}: {'rejected' if args.reject else 'approved'} by {args.approver}")
    return 0


def cmd_status(args, overrides: list[str]) -> int:
    """Who holds the retrain slot (and whether it is alive), and the last runs with their outcomes."""
    cfg = _load(overrides)
    from components import tracking
    from flows.slot import status_lines

    tracking.setup(cfg)
    print(f"project {cfg.root_path}, Prefect server {_prefect_server(cfg)}")
    print("\n".join(status_lines(cfg)))
    print(f"  {_where(cfg)}")
    return 0


def cmd_serve(args, overrides: list[str]) -> int:
    cfg = _load(overrides)
    from flows.serve import DEPLOYMENT, serve

    print(
        f"serving deployment retrain-service/{DEPLOYMENT}: schedule {cfg.infra.retrain_cron or 'none'}, "
        f"{'retrain on every rlhf.data.updated event for ' + str(cfg.data_path) if cfg.infra.retrain_on_new_data else 'no event trigger'}, "
        "one run at a time (Ctrl-C or SIGTERM stops)"
    )
    if cfg.infra.prefect_api_url:
        print(f"  Prefect server: {cfg.infra.prefect_api_url} (runs, schedule and automation in its UI)")
    else:
        print(
            "  no shared Prefect server configured: this process starts a temporary one, so events from `rlhf "
            "ingest` in other processes do not reach it.\n  For the event trigger run `prefect server start` and "
            "pass infra.prefect_api_url=http://127.0.0.1:4200/api to both commands."
        )
    serve(cfg, overrides)
    print(f"stopped serving retrain-service/{DEPLOYMENT} (its schedule is paused until the next `rlhf serve`)")
    print(f"  {_where(cfg)}")
    return 0


# ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    over = {"nargs": "*", "help": "Hydra overrides, e.g. model=tiny data.seed=7"}
    sub.add_parser("run", help="run the pipeline").add_argument("rest", **over)
    sub.add_parser("data", help="materialise and show the data version").add_argument("rest", **over)
    sub.add_parser(
        "serve", help="run retrain as a long-lived deployment: cron schedule + new-data trigger"
    ).add_argument("rest", **over)
    m = sub.add_parser("model", help="serve a registered model: `rlhf model serve [--alias champion] [--port 5001]`")
    m.add_argument("action", choices=["serve"])
    m.add_argument("--alias", default="champion", help="alias (champion, challenger) or version number")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=5001)
    m.add_argument("rest", **over)
    r = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    r.add_argument("--reason", default="", help="why (recorded on the version and its model card)")
    r.add_argument("--by", default=os.environ.get("USER", "unknown"), help="who rolls back")
    r.add_argument("rest", **over)
    sub.add_parser("status", help="who holds the retrain slot; the last runs and their outcomes").add_argument(
        "rest", **over
    )
    a = sub.add_parser("approve", help="approve (or --reject) a retrain paused for approval")
    a.add_argument("--reject", action="store_true")
    a.add_argument("--approver", default=os.environ.get("USER", "unknown"))
    a.add_argument("--comment", default="")
    a.add_argument("rest", nargs="*", help="FLOW_RUN_ID then Hydra overrides")
    c = sub.add_parser("config", help="print the resolved config")
    c.add_argument("--options", action="store_true", help="list the options of every config group")
    c.add_argument("rest", **over)
    v = sub.add_parser("validate", help="validate data (default: the data dir) with Great Expectations")
    v.add_argument("--kind", choices=["demonstrations", "preferences", "prompts", "eval"])
    v.add_argument("rest", nargs="*", help="[PATH] then Hydra overrides")
    i = sub.add_parser("ingest", help="validate and add a batch of new examples")
    i.add_argument("--kind", required=True, choices=["demonstrations", "preferences", "prompts"])
    i.add_argument("--quarantine", action="store_true", help="ingest the good rows; write bad rows with reasons aside")
    i.add_argument("rest", nargs="*", help="FILE then Hydra overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after options: `ingest F --kind k a=b`
    unknown = [t for t in extra if t.startswith("-") and "=" not in t]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides, positional = _split(args.rest + [t for t in extra if t not in unknown])
    try:
        if args.command in ("validate", "ingest", "approve"):
            return {"validate": cmd_validate, "ingest": cmd_ingest, "approve": cmd_approve}[args.command](
                args, overrides, positional
            )
        if positional:
            print(
                f"rlhf {args.command}: unexpected arguments {positional} (overrides look like key=value)",
                file=sys.stderr,
            )
            return 2
        return {
            "run": cmd_run,
            "data": cmd_data,
            "config": cmd_config,
            "rollback": cmd_rollback,
            "serve": cmd_serve,
            "status": cmd_status,
            "model": cmd_model,
        }[args.command](args, overrides)
    except ConfigError as e:
        print(f"✗ config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted (Ctrl-C): a killed retrain resumes from its checkpoints on the next `rlhf run`",
            file=sys.stderr,
        )
        return 130
    except Exception as e:  # a last line of defence: say what happened, keep the traceback for debugging
        from components.data.versioning import DataVersionError

        if isinstance(e, DataVersionError):
            print(f"✗ {e}", file=sys.stderr)
            return 1
        if os.environ.get("RLHF_DEBUG"):
            raise
        print(
            f"✗ internal error: {type(e).__name__}: {e}\n  (rerun with RLHF_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1
    except BaseException as e:  # Prefect turns SIGTERM into TerminationSignal (a BaseException)
        if type(e).__name__ != "TerminationSignal":
            raise
        print(
            "\nstopped by SIGTERM: a killed retrain resumes from its checkpoints on the next `rlhf run`",
            file=sys.stderr,
        )
        return 143


if __name__ == "__main__":
    sys.exit(main())
