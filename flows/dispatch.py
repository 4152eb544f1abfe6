"""Training stages on a work pool (`infra.training_pool`, e.g. `gpu`): each stage is its own Prefect flow run
on a worker of that pool, possibly on another machine.

    orchestrator (retrain flow)                         worker (`rlhf worker --pool gpu`)
    cached task `sft` --run_deployment(stage-sft/gpu)-->  flow `stage-sft`: compose the config from the
      request: overrides, data version, input URIs          (allow-listed) overrides, fetch the data version
                                                            from the DVC remote, download the input URIs, run
                                                            the stage as in-process, log its outputs to its
      <-- stage_output.json of the stage's MLflow run ---   MLflow child run (artifact proxy)

What crosses machines is a URI, never a local path: data by DVC version (the remote both sides configure),
stage outputs as `runs:/<run_id>/output/...` artifacts. Caching (the orchestrator's cached tasks, keyed on
those URIs), one retrain at a time (the orchestrator's slot) and transient-only retries work as in process;
checkpoints live in the worker's state dir (`RLHF_WORKER_DIR`): a restarted stage resumes on a worker that
reaches it (shared storage for a pool of several machines).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from components.config import Config, compose
from components.data.versioning import DataState
from flows.caching import prune_stage_outputs, reuse_key_of, stage_root
from flows.contracts import Evaluation, StageOutput
from flows.locations import OUTPUT, available, check_input, inputs_in_use, prune_inputs

RECORD = "stage_output.json"  # what the stage hands back: its StageOutput / Evaluation, or its error
REUSE_TAG = "rlhf.reuse_key"  # on a finished run whose result may be reused (the demo base)
TRANSIENT_MARK = "[transient]"  # in a stage flow run's failure message: retry it
# orchestrator-side overrides a worker never receives: where its files live, how it dispatches and tracks
# (a worker has its own infra and tracking settings; its stage runs join the parent run's experiment)
LOCAL_ONLY = ("root", "infra.*", "tracking.*")
SENT_ANYWAY = ("tracking.run_name_prefix",)
# A request the orchestrator signed (the deployment's signing key, service/keys.py: purpose `stage-request`) carries
# the operator's config: the worker takes all of its overrides, the evaluation and gate settings the evaluate stage
# measures with included. The orchestrator checked its own triggered runs against its list (flows/serve.py) before it
# signed. A request without a valid signature (a direct Prefect call to a stage deployment) gets the worker's own
# infra.remote_overrides alone, within their bounds.
SIGNATURE = "signature"
REUSE_SIGNATURE = "reuse_signature"
WORKER_LABEL = "prefect.worker.name"  # Prefect's label on a flow run: the worker that took it
STAGES = ("base", "sft", "reward-model", "ppo", "rejection-sampling", "grpo", "rloo", "dpo", "kto", "evaluate")


class StageFailed(RuntimeError):
    """A stage failed on its worker (its own error: not retried)."""


class ConfigMismatch(RuntimeError):
    """A worker composed another config than the orchestrator's (other code or conf/): never train on it."""


class StageTimeout(TimeoutError):
    """A stage did not finish within infra.stage_timeout_s: cancelled, then retried (transient)."""


class StageLost(ConnectionError):
    """A stage's flow run crashed or was cancelled with no record (a lost worker): transient, retried."""


def sign_request(cfg: Config, request: dict[str, Any]) -> dict[str, Any]:
    """`request` with the orchestrator's signature over all of it."""
    from components.registry import provenance
    from service import keys

    ring = keys.load(cfg)
    assert ring is not None
    kid, secret = ring.signer()
    return {**request, SIGNATURE: provenance.sign(kid, secret, provenance.STAGE_REQUEST, request)}


def request_trust(request: dict[str, Any], local: Config) -> str:
    """provenance.OK when this worker's keyring verifies the request's signature, else why not."""
    from components.registry import provenance
    from service import keys

    ring = keys.load(local, create=False)
    if ring is None:
        return f"this worker has no signing keyring (set {keys.KEYS_ENV} to the deployment's)"
    fields = {k: v for k, v in request.items() if k != SIGNATURE}
    return provenance.verify(ring.verifying(), provenance.STAGE_REQUEST, fields, request.get(SIGNATURE))


def worker_dir() -> Path:
    return Path(os.environ.get("RLHF_WORKER_DIR", ".")).expanduser().resolve()


def deployment_name(stage: str, pool: str) -> str:
    return f"stage-{stage}/{pool}"


# ---------------------------------------------------------------------------------------- orchestrator
def config_digest(cfg: Config) -> dict[str, Any]:
    """What a stage trains and judges with: every section but where files live and how runs are tracked or
    dispatched. A worker composes its config from its own conf/ plus the overrides; this lets it check that
    the result is the orchestrator's (same code and conf/ on both sides), key by key."""
    from components.config import to_dict

    return {k: v for k, v in to_dict(cfg).items() if k not in ("root", "overrides", "infra", "tracking")}


def config_differences(expected: dict[str, Any], cfg: Config) -> list[str]:
    from components.tracking import flatten

    want, have = flatten(expected), flatten(config_digest(cfg))
    return [
        f"{k}: orchestrator {want.get(k)!r}, worker {have.get(k)!r}"
        for k in sorted(want.keys() | have.keys())
        if want.get(k) != have.get(k)
    ]


def remote_overrides(cfg: Config) -> list[str]:
    """The orchestrator's overrides minus where its own files live (the worker has its own) and minus any
    that holds a credential (it would be stored in Prefect's flow-run parameters; a worker takes its
    credentials from its own environment)."""
    from components.tracking import redact_override

    def local_only(o: str) -> bool:
        key = o.lstrip("+~").split("=", 1)[0]
        return key not in SENT_ANYWAY and any(fnmatchcase(key, p) for p in LOCAL_ONLY)

    return [o for o in cfg.overrides if not local_only(o) and redact_override(o) == o]


def dispatch(
    stage: str, cfg: Config, data: DataState, parent_run_id: str, inputs: dict[str, str], reuse_key: str | None = None
) -> Any:
    """Run `stage` as a flow run on the training pool and wait for it; returns what the stage returns
    (StageOutput with URIs, or Evaluation). The stage flow run is a subflow of this retrain in the UI.
    With `reuse_key`, a finished earlier run of the stage with that key is reused instead (the demo base:
    not a Prefect-cached task, but its URI must stay the same for the later stages' cache keys)."""
    import mlflow
    from prefect import get_run_logger
    from prefect.deployments import run_deployment

    log = get_run_logger()
    pool = cfg.infra.training_pool
    if reuse_key and (earlier := _reusable(cfg, reuse_key)) is not None:
        log.info("%s: unchanged inputs, reusing %s", stage, earlier["result"]["dir"])
        return _decode(stage, earlier["result"])
    from components.tracking import redacted

    request = sign_request(
        cfg,
        {
            "stage": stage,
            "config": redacted(config_digest(cfg)),  # stored in Prefect: no secret in it
            "overrides": remote_overrides(cfg),
            "data_version": data.version,
            "inputs": inputs,
            "parent_run_id": parent_run_id,
            "issued_at": time.time(),  # a signed request is good for infra.stage_timeout_s: no replay months later
        },
    )
    log.info("%s: dispatched to work pool %r (deployment %s)", stage, pool, deployment_name(stage, pool))
    warn_if_no_worker(pool, log)
    run = run_deployment(
        deployment_name(stage, pool),
        parameters={"request": request},
        timeout=0,  # created, not waited for: `wait_for_stage` watches the worker too
        as_subflow=True,
        tags=["rlhf", f"stage:{stage}"],
    )
    run = wait_for_stage(run.id, pool, cfg.infra.stage_timeout_s, cfg.infra.worker_lost_s)
    record = _read_record(cfg, run.id, parent_run_id, request[SIGNATURE])
    state = run.state
    if record and "error" not in record and state is not None and state.is_completed():
        log.info("%s: done on %s (flow run %s)", stage, pool, run.name)
        mlflow.set_tag(f"pool.{stage}", f"{pool}: flow run {run.name} ({run.id})")
        return _decode(stage, record["result"])
    if record and "error" in record:
        from components.training.ppo import PPODivergence

        err, msg = record["error"], record["message"]
        if err == "PPODivergence":
            raise PPODivergence(msg)
        cls = StageLost if record.get("transient") else StageFailed
        raise cls(f"{stage} failed on work pool {pool!r} (flow run {run.name}): {err}: {msg}")
    if state is None or not state.is_final():  # infra.stage_timeout_s passed: stop it, retry
        _cancel(run.id, "stage timeout (infra.stage_timeout_s)")
        raise StageTimeout(
            f"{stage} did not finish within infra.stage_timeout_s={cfg.infra.stage_timeout_s} s on work pool "
            f"{pool!r} (flow run {run.name}, state {state.name if state else 'none'}); it was cancelled"
        )
    lost = state.is_crashed() or state.is_cancelled() or TRANSIENT_MARK in (state.message or "")
    raise (StageLost if lost else StageFailed)(
        f"{stage} ended {state.name} on work pool {pool!r} (flow run {run.name}, {run.id}): {state.message}"
    )


POLL_S = 1.0  # Prefect's default 5 s would add up to 5 s to every stage
CANCEL_WAIT_S = 60.0  # how long a cancelled stage is given to stop before its retry is dispatched


def wait_for_stage(flow_run_id, pool: str, timeout_s: float | None, worker_lost_s: float):
    """Poll a dispatched stage's flow run until it is final, `timeout_s` passes (-> the run, not final), or its worker
    has not been online for `worker_lost_s` by this process's monotonic clock: then the run is marked Crashed and
    StageLost raised, which the retrain retries. Its worker is the one that took the run (Prefect labels the run
    with the worker's name); before one takes it, any worker of `pool`. Prefect's server marks a worker offline when
    its heartbeats stop, and Prefect OSS never crashes the flow run a vanished worker held: a worker lost while
    another of the pool polls on would otherwise leave its stage Running forever."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    started = time.monotonic()
    lost_since: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            try:
                run = client.read_flow_run(flow_run_id)
                workers = client.read_workers_for_work_pool(pool)
            except (OSError, httpx.HTTPError):  # the Prefect server restarting: nothing known, wait on
                time.sleep(POLL_S)
                continue
            if run.state is not None and run.state.is_final():
                return run
            now = time.monotonic()
            if timeout_s is not None and now - started > timeout_s:
                return run
            took = (run.labels or {}).get(WORKER_LABEL)
            online = {w.name for w in workers if str(w.status).upper().endswith("ONLINE")}
            alive = took in online if took else bool(online)
            lost_since = None if alive else (lost_since or now)
            if lost_since is not None and now - lost_since > worker_lost_s:
                whose = f"its worker {took!r} has not" if took else f"no worker of work pool {pool!r} has"
                why = (
                    f"{whose} been online for {now - lost_since:.0f} s "
                    f"(infra.worker_lost_s={worker_lost_s:g}) while flow run {run.name} was {run.state_name}"
                )
                client.set_flow_run_state(flow_run_id, Crashed(message=f"worker lost: {why}"), force=True)
                raise StageLost(f"{why}: the stage is retried on a worker of the pool (`rlhf worker --pool {pool}`)")
            time.sleep(POLL_S)


def _cancel(flow_run_id, why: str) -> None:
    """Cancel a stage's flow run and wait (at most CANCEL_WAIT_S) until it has stopped, so that its retry does
    not start while it still writes its stage dir (which a second writer is refused: flows/caching.stage_dir_lock)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message=why), force=True)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run_id).state
            if state is None or state.is_final():
                return
            time.sleep(POLL_S)


def warn_if_no_worker(pool: str, log) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    if not any(str(w.status).upper().endswith("ONLINE") for w in workers):
        log.warning("no worker is polling work pool %r: start one with `rlhf worker --pool %s`", pool, pool)


def _read_record(cfg: Config, flow_run_id, parent_run_id: str, request_signature: str) -> dict | None:
    """The stage's record, from the MLflow child run its flow run made (tag rlhf.flow_run_id), only if the worker
    signed it for this request and flow run: both ids are visible to any Prefect API caller, and a run with a forged
    `stage_output.json` (a passing evaluation, another policy dir) would otherwise be taken."""
    binding = {"flow_run_id": str(flow_run_id), "parent_run_id": parent_run_id, "request": request_signature}
    return _first_record(
        cfg,
        f"tags.`rlhf.flow_run_id` = '{flow_run_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        binding,
    )


def _reusable(cfg: Config, reuse_key: str) -> dict | None:
    record = _first_record(
        cfg, f"tags.`{REUSE_TAG}` = '{reuse_key}' and attributes.status = 'FINISHED'", {"reuse_key": reuse_key}
    )
    return record if record and "result" in record and available(record["result"]["dir"]) else None


def _first_record(cfg: Config, filter_string: str, binding: dict[str, Any]) -> dict | None:
    """The first record among the matching runs whose worker signature verifies for `binding`."""
    import mlflow

    from components.registry import provenance
    from service import keys

    ring = keys.load(cfg)
    assert ring is not None
    runs = mlflow.search_runs(filter_string=filter_string, output_format="list", search_all_experiments=True)
    for run in runs:
        try:
            record = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{RECORD}"))
        except Exception:  # that run has no record: killed before it wrote one
            continue
        fields = {"record": {k: v for k, v in record.items() if k not in (SIGNATURE, REUSE_SIGNATURE)}, **binding}
        signature = record.get(REUSE_SIGNATURE if "reuse_key" in binding else SIGNATURE)
        if provenance.verify(ring.verifying(), provenance.STAGE_RESULT, fields, signature) == "ok":
            return record
    return None


def _decode(stage: str, result: dict) -> Any:
    if stage == "base":
        return result["dir"]
    return Evaluation(**result) if stage == "evaluate" else StageOutput(**result)


# ---------------------------------------------------------------------------------------------- worker
def run_request(request: dict[str, Any], body: Callable[..., Any]) -> dict:
    """The worker side of a stage: config, data and inputs on this machine, then `body` (the in-process
    stage), its outputs logged as artifacts of its MLflow run, and the record the orchestrator reads.
    Any error is recorded with whether it is transient; before the stage's MLflow run exists, the flow run's
    failure message carries it (TRANSIENT_MARK)."""
    from prefect.runtime import flow_run

    binding = {
        "flow_run_id": str(flow_run.id),
        "parent_run_id": str(request.get("parent_run_id", "")),
        "request": str(request.get(SIGNATURE, "")),
    }
    try:
        out = _run_here(request, body)
    except Exception as e:
        record = {"error": type(e).__name__, "message": str(e), "transient": is_transient(e)}
        if not _write_record(record, binding) and record["transient"]:
            raise RuntimeError(f"{TRANSIENT_MARK} {type(e).__name__}: {e}") from e
        raise
    out, key = out
    _write_record({"result": asdict(out)}, binding, key)
    return {"result": asdict(out)}


def _run_here(request: dict[str, Any], body: Callable[..., Any]) -> tuple[Any, str | None]:
    """-> the stage's output, and the reuse key of what was built (the demo base; None otherwise), computed here
    from the config and data this worker used: a request cannot name it."""
    import mlflow

    from components import tracking
    from components.config import check_remote_overrides
    from components.data.versioning import fetch_version
    from service.env import configure_environment

    root = worker_dir()
    local = compose([f"root={root}"])
    trust = request_trust(request, local)
    if trust == "ok" and (stale := _replayed(request, local)):
        trust = stale
    if trust != "ok":  # not the orchestrator's (or not now, not for this stage): the remote list alone
        import logging

        logging.getLogger("rlhf.worker").warning(
            "stage request not signed by the orchestrator (%s): remote overrides only", trust
        )
        check_remote_overrides(request["overrides"], local.infra.remote_overrides, base=local)
    cfg = compose([*request["overrides"], f"root={root}", "infra.training_pool=null"])  # run here, not dispatch
    if diff := config_differences(request["config"], cfg):
        raise ConfigMismatch(
            "this worker's config differs from the orchestrator's (install the same rlhf-ops version and conf/ on "
            "both; the worker composes conf/ + the run's overrides):\n  " + "\n  ".join(diff[:20])
        )
    configure_environment(cfg)
    tracking.setup(cfg)
    parent = mlflow.MlflowClient().get_run(request["parent_run_id"])
    mlflow.set_experiment(experiment_id=parent.info.experiment_id)  # the stage's run sits beside its parent
    for name, location in request["inputs"].items():  # before anything is fetched: nothing to another host
        check_input(name, location, cfg, parent.info.experiment_id)
    data = fetch_version(cfg, request["data_version"])
    with inputs_in_use(cfg, request["inputs"]) as inputs:  # not pruned while this stage reads them
        out = body(cfg, data, parent_run_id=request["parent_run_id"], **inputs)  # by name: JSON may reorder
    if removed := prune_inputs(cfg):
        from prefect import get_run_logger

        get_run_logger().info(
            "pruned %d downloaded input(s) beyond the most recently used: %s", len(removed), ", ".join(removed)
        )
    if isinstance(out, str):  # the demo base: a local dir, reusable by a later retrain (a key of what was built)
        return StageOutput(_publish(Path(out), Path(out)), _active_or_last_run(), {}), reuse_key_of("base", cfg, data)
    if isinstance(out, StageOutput):
        stage_dir = stage_root(cfg, out.dir)
        out.dir = _publish(stage_dir, Path(out.dir), out.run_id)
        os.utime(stage_dir)  # this worker keeps its most recently used stage dirs, as a local run does
        prune_stage_outputs(cfg.state_path / "stages", cfg.infra.keep_stage_outputs, {stage_dir.resolve()})
    return out, None


def _replayed(request: dict[str, Any], local: Config) -> str | None:
    """Why a request the orchestrator signed is not for this run, or None: it names another stage than this flow's,
    or was issued longer ago than infra.stage_timeout_s (a replay of an old request through the Prefect API)."""
    from prefect.runtime import flow_run

    flow = str(flow_run.flow_name or "")
    if flow.startswith("stage-") and request.get("stage") != flow[len("stage-") :]:
        return f"signed for stage {request.get('stage')!r}, sent to {flow}"
    limit = local.infra.stage_timeout_s or 86400.0
    issued = request.get("issued_at")
    if not isinstance(issued, (int, float)) or time.time() - issued > limit:
        return f"issued {'at an unknown time' if not isinstance(issued, (int, float)) else f'{time.time() - issued:.0f} s ago'} (a signed request is good for {limit:g} s)"
    return None


def is_transient(e: BaseException) -> bool:
    """What may succeed on a second try: network and timeouts, real I/O errors (they carry an errno; library
    errors subclassing OSError do not). Never bad data, a bad config or a diverged PPO run."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return isinstance(e, OSError) and e.errno is not None


def _active_or_last_run() -> str:
    import mlflow

    run = mlflow.last_active_run()
    return run.info.run_id if run else ""


def _publish(root: Path, out: Path, run_id: str | None = None) -> str:
    """Log a stage's outputs (its dir minus checkpoints) to its MLflow run; returns the URI of `out`."""
    import mlflow

    run_id = run_id or _active_or_last_run()
    client = mlflow.MlflowClient()
    for entry in sorted(root.iterdir()):
        if entry.name in ("checkpoints",) or entry.name.startswith("."):
            continue
        if entry.is_dir():
            client.log_artifacts(run_id, str(entry), f"{OUTPUT}/{entry.name}")
        else:
            client.log_artifact(run_id, str(entry), OUTPUT)
    rel = out.resolve().relative_to(root.resolve()).as_posix()
    return f"runs:/{run_id}/{OUTPUT}" + ("" if rel == "." else f"/{rel}")


def _write_record(record: dict, binding: dict[str, Any], reuse_key: str | None = None) -> bool:
    """On the stage's MLflow run (this flow run's process started exactly one), signed with the deployment's keyring
    for `binding` (this request and flow run), or for `reuse_key` when the result may be reused; False when there is
    no run. A worker without the keyring writes it unsigned: the orchestrator then does not take it."""
    import mlflow

    from components.registry import provenance
    from service import keys

    run = mlflow.last_active_run()
    if run is None:
        return False
    try:
        ring = keys.load(compose([f"root={worker_dir()}"]), create=False)
    except keys.KeyringError:
        ring = None
    signed = json.loads(json.dumps(record, default=str))  # what the orchestrator will read back
    if ring is not None:
        kid, secret = ring.signer()
        body = {"record": dict(signed)}
        signed[SIGNATURE] = provenance.sign(kid, secret, provenance.STAGE_RESULT, {**body, **binding})
        if reuse_key:  # a later retrain may reuse it (the demo base): signed for that key too
            signed[REUSE_SIGNATURE] = provenance.sign(
                kid, secret, provenance.STAGE_RESULT, {**body, "reuse_key": reuse_key}
            )
    client = mlflow.MlflowClient()
    client.log_text(run.info.run_id, json.dumps(signed, default=str), RECORD)
    if reuse_key:  # last: a run with the tag has its record
        client.set_tag(run.info.run_id, REUSE_TAG, reuse_key)
    return True
