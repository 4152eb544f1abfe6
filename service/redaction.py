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
        return super().serialize_parameters({k: _shown(v) for k, v in parameters.items()})


def _shown(value: Any) -> Any:
    """A Config as its redacted dict; override strings (`key=value`, in lists: a sweep's variants) redacted."""
    if isinstance(value, Config):
        return tracking.redacted(to_dict(value))
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    if isinstance(value, str) and "=" in value:
        return tracking.redact_override(value)
    return value


def config_flow(**options: Any):
    """`@flow(**options)` for a flow that takes the config: its stored parameters are redacted."""
    return lambda fn: ConfigFlow(fn=fn, **options)
