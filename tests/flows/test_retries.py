"""Retries are for transient errors only: I/O and network failures, never bad data or divergence."""

import asyncio
import errno

import pytest
from prefect.states import exception_to_failed_state

from components.data.versioning import DataVersionError
from components.training.ppo import PPODivergence
from flows.stages import transient


@pytest.mark.parametrize(
    "error, retried",
    [
        (ConnectionError("connection reset"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.EIO, "input/output error"), True),
        (OSError("not a file error: a library's OSError without errno"), False),
        (PPODivergence("KL above the ceiling"), False),
        (DataVersionError("data.dvc points at a missing version"), False),
        (ValueError("bad config"), False),
    ],
)
def test_only_transient_errors_are_retried(error, retried):
    assert transient(None, None, asyncio.run(exception_to_failed_state(error))) is retried
