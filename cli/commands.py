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
