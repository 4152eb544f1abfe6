"""Flow `retrain`: the pipeline, one Prefect task per stage, one MLflow child run per stage.

    prepare data (dvc pull or demo) -> validate (Great Expectations) -> ... training stages

Flows wire components; they hold no tensor code. A stage's child run is nested under
one parent run per pipeline run; params are the flattened resolved config.
"""
from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.states import Completed, Failed

from components import tracking
from components.config import Config, to_yaml
from components.data.validation import validate_dataset
from components.data.versioning import DataState, DataVersionError, ensure_data


@dataclass
class ValidationSummary:
    ok: bool
    rows: dict[str, int]
    problems: int
    report: str
    docs_index: str | None
    run_id: str


def git_commit(root: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


@task(name="prepare-data")
def prepare_data(cfg: Config) -> DataState:
    state = ensure_data(cfg)
    get_run_logger().info("data version %s (%s): %s", state.version, state.origin, state.rows)
    return state


@task(name="validate")
def validate(cfg: Config, data: DataState, parent_run_id: str) -> ValidationSummary:
    log = get_run_logger()
    with mlflow.start_run(run_name="validate", nested=True, parent_run_id=parent_run_id) as run:
        mlflow.set_tags({"stage": "validate", "data_version": data.version})
        report = validate_dataset(cfg.data_path, cfg.data, cfg.state_path / "gx")
        mlflow.log_metrics({"data/rows_" + k: v for k, v in report.rows.items()}
                           | {"data/problems": len(report.findings), "data/valid": float(report.ok)})
        text = report.format(f"data {data.version}", cfg.data.report_max_examples)
        mlflow.log_text(text, "validation_report.txt")
        if report.docs_index:
            mlflow.log_artifacts(str(report.docs_index.parent), artifact_path="data_docs")
        (log.info if report.ok else log.error)("%s", text)
        return ValidationSummary(report.ok, report.rows, len(report.findings), text,
                                 str(report.docs_index) if report.docs_index else None, run.info.run_id)


@flow(name="retrain", log_prints=True, validate_parameters=False)
def retrain(cfg: Config):
    """The pipeline. Returns a summary dict; a Failed state (with the reason) on bad data."""
    tracking.setup(cfg)
    with mlflow.start_run(run_name=tracking.run_name(cfg, "retrain")) as parent:
        tracking.log_config(cfg)
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.set_tags({"pipeline": "retrain", "git_commit": git_commit(cfg.root_path), "base_model": cfg.model.name})
        try:
            data = prepare_data(cfg)
        except DataVersionError as e:
            mlflow.set_tag("outcome", "data unavailable")
            return Failed(message=f"data unavailable: {e}")
        mlflow.set_tag("data_version", data.version)
        validation = validate(cfg, data, parent.info.run_id)
        summary = {"run_id": parent.info.run_id, "data": asdict(data), "validation": asdict(validation)}
        if not validation.ok:
            mlflow.set_tag("outcome", "invalid data")
            return Failed(message=f"data validation failed ({validation.problems} problem(s)); no training ran.\n"
                                  f"{validation.report}", data=summary)
        mlflow.set_tag("outcome", "validated")
        return Completed(data=summary, message="data validated")
