"""`rlhf` commands on data and config (config, data, validate, ingest, forget), and what every command shares:
loading the config and the process environment, and where to look afterwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from components.config import Config, compose_project, group_options


def _load(overrides: list[str], prefect: bool = True) -> Config:
    """The config, and the process environment set from it (before Prefect is imported)."""
    cfg = compose_project(overrides)  # the project's rlhf.yaml first, then the command line
    from service.env import configure_environment, temporary_server_notice

    configure_environment(cfg)
    if prefect and (notice := temporary_server_notice(cfg)):
        print(notice, file=sys.stderr)
        from service.env import start_temporary_server_early

        start_temporary_server_early()  # boots while the command imports and sets up the rest
    check_servers(cfg, prefect)
    return cfg


def check_servers(cfg: Config, prefect: bool = True) -> None:
    """Shared servers answer and accept our credentials (`credentials.Unauthorised` says what to set)."""
    from components import tracking
    from service import credentials

    credentials.check_access(tracking.tracking_uri(cfg), os.environ.get("PREFECT_API_URL") if prefect else None)


def _prefect_server(cfg: Config) -> str:
    from components.tracking import redact_url

    url = cfg.infra.prefect_api_url or os.environ.get("PREFECT_API_URL")
    return redact_url(url) if url else "(a temporary one of this command)"


def _where(cfg: Config) -> str:
    from components import tracking

    return f"MLflow UI: {tracking.ui_command(cfg)}"


def cmd_init(args) -> int:
    """`rlhf init [DIR] [--model M] [--demo]`: service/project.py makes the project; this says what to do next."""
    from service.project import InitRefused, init_project

    try:
        project = init_project(Path(args.dir), args.model, args.demo)
    except InitRefused as e:
        print(f"✗ rlhf init: {e}", file=sys.stderr)
        return 1
    if args.model is not None:
        from components.models.fit import check_model_fits

        if problems := check_model_fits(project.cfg):
            print(f"! {project.root / 'rlhf.yaml'}: the model does not fit these settings yet:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            print(
                "  fix what each line names (a setting: in rlhf.yaml, e.g. `sft:` then `  max_length: 64`; the model: "
                "its directory); `rlhf run` refuses until then",
                file=sys.stderr,
            )
    here = "" if project.root == Path.cwd().resolve() else f"cd {project.root} && "
    print(f"✓ project in {project.root}")
    for f in project.files:
        print(f"  {f.relative_to(project.root)}{'/' if f.is_dir() else ''}")
    first = "rlhf run" if args.demo else "rlhf ingest FILE --kind demonstrations   (then preferences, prompts, eval)"
    print(f"  next: {here}{first}; the walk-through: docs/quickstart.md")
    return 0


def cmd_config(args, overrides: list[str]) -> int:
    if args.options:
        for group, options in group_options().items():
            print(f"{group}: {', '.join(o for o in options if o != 'schema')}")
        return 0
    from components.tracking import redacted_yaml

    print(redacted_yaml(compose_project(overrides)), end="")  # pasted into issues and chats: no credentials
    return 0


def cmd_data(args, overrides: list[str]) -> int:
    from components.data.versioning import ensure_data

    cfg = _load(overrides, prefect=False)
    state = ensure_data(cfg)
    print(f"✓ data version {state.version} ({state.origin}) in {cfg.data_path}")
    if state.origin == "switched":
        print("  data.dvc pinned another demo data set (the demo alone): it now pins this one; nothing else changed")
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
        report, _ = validate_batch(
            path, kind, cfg.data, gx_root, None if inside else cfg.data_path, index_dir=cfg.state_path / "index"
        )
        title = f"{path} ({kind}{'' if args.kind else ', inferred'}{'' if inside else ', checked against ' + str(cfg.data_path)})"
    print(report.format(title, cfg.data.report_max_examples))
    if report.docs_index:
        print(f"  Data Docs: {report.docs_index}")
    return 0 if report.ok else 1


def cmd_feedback(args, overrides: list[str], positional: list[str]) -> int:
    """`rlhf feedback TRACE_ID up|down [--rating R] [--url URL] [--token T]`: a rater's judgement of a served answer,
    sent to the served app's `POST /feedback` (service/feedback_api.py), which checks and records it: one code path
    for the rules. The token is the rater's (`rlhf raters add NAME`), from --token or RLHF_RATER_TOKEN."""
    import json
    import urllib.error
    import urllib.request

    if len(positional) != 2 or positional[1] not in ("up", "down"):
        print("rlhf feedback: expected TRACE_ID then up or down, e.g. `rlhf feedback tr-1a2b up`", file=sys.stderr)
        return 2
    trace_id, vote = positional
    token = args.token or os.environ.get("RLHF_RATER_TOKEN")
    if not token:
        print(
            "✗ feedback: no rater token: pass --token or set RLHF_RATER_TOKEN (the operator gives one with "
            "`rlhf raters add NAME`)",
            file=sys.stderr,
        )
        return 2
    body = {"trace_id": trace_id, "value": vote == "up", **({"rating": args.rating} if args.rating is not None else {})}
    url = args.url.rstrip("/") + "/feedback"
    request = urllib.request.Request(
        url,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message", "")
        except ValueError:
            message = ""
        print(f"✗ feedback refused ({e.code}): {message or e.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(
            f"✗ feedback: no served model answers at {url} ({e}): start `rlhf model serve` or pass --url",
            file=sys.stderr,
        )
        return 1
    rated = f", rating {args.rating:g}" if args.rating is not None else ""
    print(f"✓ {doc['rater']}: thumbs {vote}{rated} on {trace_id} (assessment {doc['assessment_id']})")
    print("  `rlhf ingest --from-traces` turns the judged answers into feedback rows for the next retrain")
    return 0


def cmd_forget(args, overrides: list[str]) -> int:
    """`rlhf forget --rater ID | --trace ID [--trace ID ...] | --user ID [--purge] [--reason TEXT]` (flows/forget.py):
    their feedback rows leave the data as a new data version, with a record under <state>/forget/ and in MLflow."""
    from components.data.forget import BadSelector, selector

    try:
        selector(args.rater, args.trace, args.user)
    except BadSelector as e:
        print(f"✗ {e}", file=sys.stderr)
        return 2
    cfg = _load(overrides)
    from flows.forget import forget_flow, summary

    state = forget_flow(
        cfg, args.rater, args.trace, args.user, args.purge, args.reason, os.environ.get("USER"), return_state=True
    )
    if state.is_failed():
        print(f"✗ {state.result(raise_on_failure=False)}", file=sys.stderr)
        return 1
    result = state.result()
    print("\n".join(summary(result)))
    if result.changed:
        print("  event: rlhf.data.updated emitted (a running `rlhf serve` retrains on the new data version)")
    return 0


def cmd_raters(args, overrides: list[str]) -> int:
    """`rlhf raters add NAME | list | revoke NAME`: who may judge served answers (service/raters.py)."""
    import time

    from service import raters

    cfg = _load(overrides, prefect=False)
    path = raters.raters_path(cfg)
    try:
        if args.action == "list":
            known = raters.read(path)
            if not known:
                print(f"no raters in {path}: `rlhf raters add NAME` adds one")
            for r in sorted(known.values(), key=lambda r: r.added):
                when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.added))
                revoked = f", revoked {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.revoked))}" if r.revoked else ""
                print(f"{r.name}: added {when} UTC{revoked}")
            return 0
        if not args.name:
            raise raters.RaterError(f"`rlhf raters {args.action}` needs the rater's NAME")
        if args.action == "revoke":
            raters.revoke(path, args.name)
            print(f"✓ revoked {args.name}: their token is refused from the next request on (raters file {path})")
            return 0
        token = raters.add(path, args.name)
    except raters.RaterError as e:
        print(f"✗ raters: {e}", file=sys.stderr)
        return 1
    print(f"✓ added rater {args.name} (raters file {path}); give them this token, shown once:")
    print(token)
    return 0


def cmd_secret(args, overrides: list[str]) -> int:
    """`rlhf secret list | rotate | retire KID`: the keys that sign served answers, votes and stage requests."""
    import time

    from service import keys

    cfg = _load(overrides, prefect=False)
    try:
        ring = keys.load(cfg)
        assert ring is not None
        if args.action == "rotate":
            key = ring.rotate()
            print(
                f"✓ {key.kid} signs from now on; older keys still verify until `rlhf secret retire KID` ({ring.path})"
            )
        elif args.action == "retire":
            if not args.kid:
                raise keys.KeyringError("`rlhf secret retire` needs the key id (`rlhf secret list` shows them)")
            ring.retire(args.kid)
            print(f"✓ {args.kid} retired: what it signed no longer counts ({ring.path})")
        else:
            for k in ring.keys:
                state = "signs" if k.kid == ring.active else ("retired" if k.retired else "verifies")
                print(f"{k.kid}: {state}, created {time.strftime('%Y-%m-%d %H:%M', time.gmtime(k.created))} UTC")
    except keys.KeyringError as e:
        print(f"✗ secret: {e}", file=sys.stderr)
        return 1
    return 0


def since_ms(text: str | None) -> int | None:
    """--since as epoch milliseconds (an ISO 8601 date or time; UTC when it names no zone)."""
    if text is None:
        return None
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(
            f"rlhf ingest: --since {text!r} is not an ISO 8601 date or time (e.g. 2026-12-01T09:00)"
        ) from None
    return int((t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp() * 1000)


def cmd_ingest(args, overrides: list[str], positional: list[str]) -> int:
    if args.from_traces:
        if positional or args.kind not in (None, "feedback"):
            raise SystemExit("rlhf ingest --from-traces: no FILE and no --kind (the rows are feedback)")
        args.kind = "feedback"
    elif len(positional) != 1 or args.kind is None:
        raise SystemExit("rlhf ingest: expected exactly one FILE and --kind (or --from-traces)")
    cfg = _load(overrides)
    from flows.ingest import ingest_flow

    source: Path | None = None if args.from_traces else Path(positional[0]).resolve()
    batch = None
    if args.from_traces:
        from components import tracking
        from flows.ingest import harvest_summary, traces_to_file

        batch = traces_to_file(cfg, since_ms(args.since))
        print("\n".join(harvest_summary(batch.harvest, cfg.tracking.experiment + tracking.SERVING_SUFFIX)))
        source = batch.path
        if source is None:
            batch.landed(None)
            print("  nothing to ingest: the data and its version are unchanged")
            return 0
        args.quarantine = True  # a row the suite refuses is set aside and remembered; the others land
    state = ingest_flow(cfg, str(source), args.kind, args.quarantine, return_state=True)
    if batch is not None and state.is_completed():
        batch.landed(state.result())
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
        print(
            f"  data version: {r.version_before or '(none: this batch starts the data set)'} -> {r.version_after}  "
            "(commit data.dvc to record it in git)"
        )
        print("  event: rlhf.data.updated emitted (triggers the retrain deployment when `rlhf serve` runs)")
    if r.quarantine:
        print(f"  quarantined rows with reasons: {r.quarantine}")
    if r.docs_index:
        print(f"  Data Docs: {r.docs_index}")
    return 0 if r.n_good else 1
