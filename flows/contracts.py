"""What the retrain flow's steps hand each other: small typed records, JSON-serialisable for Prefect's
result store (a cached stage's record is read back on the next run).

A stage output names its artifacts by a location (`StageOutput.dir`): a local directory when stages run in
the retrain's process, a `runs:/<run_id>/output/...` URI when they run on a work pool (flows/dispatch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.data.versioning import DataState


@dataclass
class StageOutput:
    """One trained stage: where its output is, the MLflow run that made it, its final metrics."""

    dir: str
    run_id: str
    metrics: dict[str, float]
    cached: bool = False  # this run took it from the cache (no new child run)


@dataclass
class ValidationSummary:
    ok: bool
    rows: dict[str, int]
    problems: int
    report: str
    docs_index: str | None
    run_id: str


@dataclass
class Evaluation:
    """The evaluation stage's result (it may run on a worker): what the gate, on the orchestrator, decides on."""

    run_id: str  # the evaluation's MLflow run: the gate's verdict is logged there too
    champion_version: str | None
    eval: dict[str, dict[str, float]]  # policy name (candidate, sft, champion) -> its metrics
    rewards: dict[str, list[float]]  # policy name -> reward per eval prompt (for the win rate)


@dataclass
class GateOutcome:
    """The evaluation of a candidate against its baseline (the champion, else the SFT policy)."""

    passed: bool
    summary: str
    reasons: list[str]
    gate_metrics: dict[str, float]
    champion_version: str | None
    eval: dict[str, dict[str, float]]  # policy name -> its metrics


@dataclass
class Registration:
    name: str
    version: str
    alias: str = "candidate"
    previous_champion: str | None = None
    approver: str | None = None


@dataclass
class RetrainSummary:
    """What `rlhf run` prints and a retrain's state carries: everything this run decided and produced."""

    run_id: str
    data: DataState
    validation: ValidationSummary
    changed: str = ""  # since the champion: first run | new data | new config | new data + config | same inputs
    nothing_new: str | None = None  # the champion version that already has this data and config
    held_by_rollback: str | None = None  # the rolled-back version with this data and config
    base: str | None = None
    sft: StageOutput | None = None
    reward: StageOutput | None = None
    policy: StageOutput | None = None
    gate: GateOutcome | None = None
    registered: Registration | None = None
    cached: list[str] = field(default_factory=list)  # stages reused from earlier runs
    mode: str = ""  # full | incremental (retrain.mode, decided against the champion: components/data/lineage.py)
    mode_reason: str = ""  # why, in one sentence
    parent: str | None = None  # incremental: the champion version its reward model and policy continue from
    slot_generation: int | None = None  # the retrain slot's fencing token when it registered (tag `slot_generation`)
