"""The `rlhf` command. Every subcommand accepts Hydra overrides: `rlhf run model=tiny ppo.steps=20`.

    rlhf init      [DIR] [--model DIR_OR_ID] [--demo]   a project of your own: data/, DVC, rlhf.yaml (docs/quickstart.md)
    rlhf run       [overrides]                          the pipeline on the configured data
    rlhf sweep     [overrides, a=1,2 sweeps]            PPO variants side by side (default: plain, PPO++,
                                                        AggreVaTeD, D2LOLS), one MLflow run each
    rlhf validate  [PATH] [--kind K] [overrides]        Great Expectations checks, readable report
    rlhf ingest    FILE --kind K [--quarantine] [...]   validate + version a new batch, emit rlhf.data.updated
    rlhf ingest    --from-traces [--since T] [...]      the people's judgements of served answers, as feedback rows
    rlhf feedback  TRACE_ID up|down [--rating R] [--url U] [--token T]   judge a served answer (POST /feedback)
    rlhf forget    --rater ID | --trace ID [...] | --user ID [--purge] [--reason TEXT]   remove their rows as a new
                                                        data version, with a record; --purge: votes and old versions too
    rlhf raters    add NAME | list | revoke NAME        who may judge served answers (bearer tokens)
    rlhf secret    list | rotate | retire KID           the keys that sign answers, votes and stage requests
    rlhf data      [overrides]                          materialise data/ (dvc pull, else the demo) and show its version
    rlhf config    [--options] [overrides]              print the resolved config (or every group's options)
    rlhf status    [overrides]                          who holds the retrain slot; the last runs and outcomes
    rlhf model serve [--alias champion] [--port 5001]   serve a registered version (MLflow scoring server)
    rlhf canary    status | check | start VERSION | stop   the canary: its arms, test and guardrails; decide and act
    rlhf services up|down|status [--dir D]              PostgreSQL + MLflow + Prefect servers (auth) on this machine
    rlhf deploy    [--pool gpu]                         the work pool and the stage deployments (infra=server)
    rlhf worker    [--pool gpu] [--dir D]               a Prefect process worker that runs training stages

Exit codes: 0 ok, 1 refused or failed (the message says why), 2 usage or config error.
The commands themselves: cli/commands.py (data) and cli/service_commands.py (the service).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cli.commands import (
    cmd_config,
    cmd_data,
    cmd_feedback,
    cmd_forget,
    cmd_ingest,
    cmd_init,
    cmd_raters,
    cmd_secret,
    cmd_validate,
)
from cli.service_commands import (
    cmd_approve,
    cmd_canary,
    cmd_deploy,
    cmd_model,
    cmd_rollback,
    cmd_run,
    cmd_serve,
    cmd_services,
    cmd_status,
    cmd_sweep,
    cmd_worker,
)
from components.config import ConfigError
from components.data.schemas import KINDS
from service.credentials import Unauthorised


def services_dir() -> Path:
    return Path(os.environ.get("RLHF_SERVICES_DIR", "~/.rlhf-services")).expanduser()


def _split(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides (key=value, +key=value, ~key) vs plain positional arguments."""
    overrides, positional = [], []
    for t in tokens:
        is_override = ("=" in t or t.startswith("~")) and not Path(t).exists()
        (overrides if is_override else positional).append(t)
    return overrides, positional


# ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    over = {"nargs": "*", "help": "Hydra overrides, e.g. model=tiny data.seed=7"}
    ini = sub.add_parser("init", help="make a project directory of your own (data/, DVC, rlhf.yaml, README)")
    ini.add_argument("dir", nargs="?", default=".", help="the project directory (default: here)")
    ini.add_argument("--model", default=None, help="your base model: a local directory or a hub id in the local cache")
    ini.add_argument("--demo", action="store_true", help="the demo data set (data=demo_small) instead of your own")
    sub.add_parser("run", help="run the pipeline").add_argument("rest", **over)
    sw = sub.add_parser(
        "sweep", help="variants side by side (Hydra sweep syntax: policy=ppo,grpo,rloo ppo/guide=none,rollin)"
    )
    sw.add_argument("rest", **over)
    sw.add_argument(
        "--promote-best",
        action="store_true",
        help="gate every variant; register and promote the best that passes (highest win rate), as `rlhf run` does",
    )
    sub.add_parser("data", help="materialise and show the data version").add_argument("rest", **over)
    sub.add_parser(
        "serve", help="run retrain as a long-lived deployment: cron schedule + new-data trigger"
    ).add_argument("rest", **over)
    m = sub.add_parser("model", help="serve a registered model: `rlhf model serve [--alias champion] [--port 5001]`")
    m.add_argument("action", choices=["serve"])
    m.add_argument("--alias", default="champion", help="alias (champion, candidate, challenger) or version number")
    m.add_argument(
        "--challenger",
        default="challenger",
        help='the canary\'s alias: while a version has it, it answers --share of the users ("": no canary)',
    )
    m.add_argument("--share", type=float, default=None, help="the challenger's share of users (registry.canary.share)")
    m.add_argument("--shadow", action="store_true", help="the challenger answers in shadow: traced, never shown")
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
    sv = sub.add_parser("services", help="start/stop/check PostgreSQL, MLflow and Prefect servers on this machine")
    sv.add_argument("action", choices=["up", "down", "status"])
    sv.add_argument("--dir", default=str(services_dir()), help="data, logs and credentials (outside the repo)")
    sv.add_argument("--postgres-port", type=int, default=5432)
    sv.add_argument("--mlflow-port", type=int, default=5000)
    sv.add_argument("--prefect-port", type=int, default=4200)
    sv.add_argument("rest", **over)
    d = sub.add_parser("deploy", help="create the work pool and the stage deployments (infra.training_pool)")
    d.add_argument("--pool", default=None, help="work pool (default: infra.training_pool, else gpu)")
    d.add_argument("rest", **over)
    w = sub.add_parser("worker", help="a Prefect process worker for the training pool")
    w.add_argument("--pool", default=None, help="work pool (default: infra.training_pool, else gpu)")
    w.add_argument("--dir", default=None, help="the worker's own state: checkpoints, caches (default: .)")
    w.add_argument("--name", default=None, help="worker name (default: host-pid)")
    w.add_argument("--limit", type=int, default=1, help="stages at a time (default 1: one GPU)")
    w.add_argument("--poll-s", type=float, default=2.0, help="how often to ask the server for work (default 2)")
    w.add_argument("rest", **over)
    a = sub.add_parser("approve", help="approve (or --reject) a retrain paused for approval")
    a.add_argument("--reject", action="store_true")
    a.add_argument("--approver", default=os.environ.get("USER", "unknown"))
    a.add_argument("--comment", default="")
    a.add_argument("rest", nargs="*", help="FLOW_RUN_ID then Hydra overrides")
    c = sub.add_parser("config", help="print the resolved config")
    c.add_argument("--options", action="store_true", help="list the options of every config group")
    c.add_argument("rest", **over)
    v = sub.add_parser("validate", help="validate data (default: the data dir) with Great Expectations")
    v.add_argument("--kind", choices=list(KINDS))
    v.add_argument("rest", nargs="*", help="[PATH] then Hydra overrides")
    i = sub.add_parser("ingest", help="validate and add a batch of new examples")
    i.add_argument("--kind", choices=list(KINDS), help="eval: only the first batch (the eval prompts are then frozen)")
    i.add_argument("--quarantine", action="store_true", help="ingest the good rows; write bad rows with reasons aside")
    i.add_argument(
        "--from-traces",
        action="store_true",
        help="the judged answers of `rlhf model serve` (kind feedback), not a FILE",
    )
    i.add_argument("--since", help="with --from-traces: answers served after this time (ISO 8601, e.g. 2026-12-01)")
    i.add_argument("rest", nargs="*", help="FILE then Hydra overrides")
    f = sub.add_parser("feedback", help="judge a served answer: thumbs up or down on its trace")
    f.add_argument("--rating", type=float, default=None, help="a graded score in data.min_rating..data.max_rating")
    f.add_argument("--url", default="http://127.0.0.1:5001", help="the served model (`rlhf model serve`)")
    f.add_argument("--token", default=None, help="the rater's token (default: $RLHF_RATER_TOKEN)")
    f.add_argument("rest", nargs="*", help="TRACE_ID up|down, then Hydra overrides")
    fo = sub.add_parser(
        "forget", help="remove a rater's, a trace's or a user's feedback rows as a new data version (docs/data.md)"
    )
    fo.add_argument("--rater", default=None, help="the rows of the traces this rater voted on (`thumbs`)")
    fo.add_argument("--trace", action="append", default=None, help="the row of this trace id (repeatable)")
    fo.add_argument("--user", default=None, help="the rows of the traces of this user (trace tag rlhf.user)")
    fo.add_argument(
        "--purge",
        action="store_true",
        help="also delete the votes, and the old shard objects from the DVC cache and remote (older versions lose them)",
    )
    fo.add_argument("--reason", default="", help="why (kept in the record)")
    fo.add_argument("rest", **over)
    ra = sub.add_parser("raters", help="who may judge served answers: `rlhf raters add NAME | list | revoke NAME`")
    ra.add_argument("action", choices=["add", "list", "revoke"])
    ra.add_argument("name", nargs="?", default=None)
    ra.add_argument("rest", **over)
    ca = sub.add_parser("canary", help="the canary: `rlhf canary status | check | start VERSION | stop`")
    ca.add_argument("action", choices=["status", "check", "start", "stop"])
    ca.add_argument("version", nargs="?", default=None)
    ca.add_argument("rest", **over)
    se = sub.add_parser("secret", help="the signing keys: `rlhf secret list | rotate | retire KID`")
    se.add_argument("action", choices=["list", "rotate", "retire"])
    se.add_argument("kid", nargs="?", default=None)
    se.add_argument("rest", **over)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after options: `ingest F --kind k a=b`
    unknown = [t for t in extra if t.startswith("-") and "=" not in t]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "init" and extra:
        parser.error(f"rlhf init takes DIR, --model and --demo only; got {' '.join(extra)}")
    overrides, positional = _split(getattr(args, "rest", []) + [t for t in extra if t not in unknown])
    for optional in ("name", "kid", "version"):  # `rlhf canary status root=X`: the override is not the VERSION
        if isinstance(value := getattr(args, optional, None), str) and "=" in value:
            overrides.insert(0, value)
            setattr(args, optional, None)
    try:
        if args.command == "init":
            return cmd_init(args)
        if args.command in ("validate", "ingest", "approve", "feedback"):
            return {"validate": cmd_validate, "ingest": cmd_ingest, "approve": cmd_approve, "feedback": cmd_feedback}[
                args.command
            ](args, overrides, positional)
        if positional:
            print(
                f"rlhf {args.command}: unexpected arguments {positional} (overrides look like key=value)",
                file=sys.stderr,
            )
            return 2
        return {
            "run": cmd_run,
            "sweep": cmd_sweep,
            "data": cmd_data,
            "config": cmd_config,
            "rollback": cmd_rollback,
            "serve": cmd_serve,
            "status": cmd_status,
            "model": cmd_model,
            "services": cmd_services,
            "deploy": cmd_deploy,
            "worker": cmd_worker,
            "raters": cmd_raters,
            "forget": cmd_forget,
            "secret": cmd_secret,
            "canary": cmd_canary,
        }[args.command](args, overrides)
    except ConfigError as e:
        print(f"✗ config error: {e}", file=sys.stderr)
        return 2
    except Unauthorised as e:
        print(f"✗ unauthorised: {e}", file=sys.stderr)
        return 1
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
