"""`rlhf` commands on data and config (config, data, validate, ingest), and what every command shares:
loading the config and the process environment, and where to look afterwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from components.config import Config, compose, group_options


def _load(overrides: list[str], prefect: bool = True) -> Config:
    """The config, and the process environment set from it (before Prefect is imported)."""
    cfg = compose(overrides)
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


def cmd_config(args, overrides: list[str]) -> int:
    if args.options:
        for group, options in group_options().items():
            print(f"{group}: {', '.join(o for o in options if o != 'schema')}")
        return 0
    from components.tracking import redacted_yaml

    print(redacted_yaml(compose(overrides)), end="")  # pasted into issues and chats: no credentials
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


def cmd_feedback(args, overrides: list[str], positional: list[str]) -> int:
    """`rlhf feedback TRACE_ID up|down [--rating R] [--rater ID]`: a person's judgement of a served answer, as
    MLflow's feedback assessment on its trace (components/registry/feedback.py)."""
    if len(positional) != 2 or positional[1] not in ("up", "down"):
        print("rlhf feedback: expected TRACE_ID then up or down, e.g. `rlhf feedback tr-1a2b up`", file=sys.stderr)
        return 2
    trace_id, vote = positional
    cfg = _load(overrides, prefect=False)
    from components import tracking
    from components.registry.feedback import BadFeedback, record_feedback

    experiment_id = tracking.setup(cfg)
    try:
        with quiet("mlflow.tracing.fluent"):  # an unknown trace is our one sentence, not MLflow's warning too
            record_feedback(trace_id, vote == "up", args.rating, args.rater, experiment_id, cfg.data)
    except BadFeedback as e:
        print(f"✗ feedback refused: {e}", file=sys.stderr)
        return 1
    rated = f", rating {args.rating:g}" if args.rating is not None else ""
    print(f"✓ {args.rater}: thumbs {vote}{rated} on {trace_id}")
    print("  `rlhf ingest --from-traces` turns the judged answers into feedback rows for the next retrain")
    return 0


def quiet(logger: str):
    """A context in which `logger` says nothing below ERROR."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def block():
        log = logging.getLogger(logger)
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(level)

    return block()


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
    if args.from_traces:
        from flows.ingest import traces_to_file

        source, h = traces_to_file(cfg, since_ms(args.since))
        print(
            f"traces: {h.judged} judged answer(s) in experiment {cfg.tracking.experiment!r}; "
            f"{h.known} already in the data, {h.ties} tied (left out), {len(h.rows)} new"
        )
        if h.empty or h.repeats:
            print(
                f"  left out: {h.empty} empty answer(s) (a feedback row needs a response), {h.repeats} repeat(s) of "
                "an earlier judged answer (the data holds each once)"
            )
        if source is None:
            print("  nothing to ingest: the data and its version are unchanged")
            return 0
    state = ingest_flow(cfg, str(source), args.kind, args.quarantine, return_state=True)
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
