"""What runs the service, used by flows and the command, never importing them: servers (PostgreSQL, MLflow,
Prefect), credentials and redaction, the process environment, the retrain slot and process lifecycle, the
multi-process launcher, Prefect compatibility shims, status."""
