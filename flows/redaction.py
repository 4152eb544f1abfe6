"""What Prefect stores of a flow run's parameters: a `Config` redacted like the MLflow params.

A flow taking the config (`retrain(cfg)`, `ingest_flow(cfg, ...)`) would otherwise send every resolved
value, credentials in URLs included, to the Prefect API, which keeps them and shows them in its UI."""

from __future__ import annotations

from typing import Any

from prefect import Flow

from components import tracking
from components.config import Config, to_dict


class ConfigFlow(Flow):
    """A Prefect flow whose `Config` parameters are stored redacted (the function still gets the real one)."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        shown = {k: tracking.redacted(to_dict(v)) if isinstance(v, Config) else v for k, v in parameters.items()}
        return super().serialize_parameters(shown)


def config_flow(**options: Any):
    """`@flow(**options)` for a flow that takes the config: its stored parameters are redacted."""
    return lambda fn: ConfigFlow(fn=fn, **options)
