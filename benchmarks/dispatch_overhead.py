"""What dispatching a stage to a worker adds, against running it in the retrain's own process (issue 12).

Starts the real servers (`rlhf services up` in a temp dir: PostgreSQL, MLflow with auth, Prefect with auth)
and one `rlhf worker --pool gpu` in its own directory, then runs the same retrain (demo_small, short
stages, fresh orchestrator dir each, so nothing is cached) twice:

    in process:  rlhf run infra=server tracking=server infra.training_pool=null
    dispatched:  rlhf run infra=server tracking=server            (stages on pool gpu)

Per stage it reports the orchestrator's task time in both modes (the difference is the dispatch overhead),
and for the dispatched run where the time went: waiting for a worker to pick the run up (poll, process
start), and the worker's setup + upload around the stage's own MLflow run. Prints a table and writes
benchmarks/results/dispatch_overhead.json.

    .venv/bin/python benchmarks/dispatch_overhead.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import services  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "dispatch_overhead.json"
RLHF = str(Path(sys.executable).with_name("rlhf"))
STAGES = {
    "base-model": "stage-base",
    "sft": "stage-sft",
    "reward-model": "stage-reward-model",
    "ppo": "stage-ppo",
    "evaluate": "stage-evaluate",
}
MLFLOW_STAGE = {"base-model": "base", "sft": "sft", "reward-model": "reward", "ppo": "ppo", "evaluate": "evaluate"}
FAST = [
    "data=demo_small",
    "model.pretrain_steps=30",
    "sft.max_steps=10",
    "reward.max_steps=10",
    "ppo.steps=2",
    "ppo.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.eval_max_prompts=8",
    "gate.max_prompts=8",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ts(s: str | None) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else float("nan")


class Prefect:
    def __init__(self, env: dict[str, str]):
        self.url = env["PREFECT_API_URL"]
        auth = services.read_env_file(Path(env["RLHF_CREDENTIALS_FILE"]))["PREFECT_API_AUTH_STRING"]
        self.auth = "Basic " + b64encode(auth.encode()).decode()

    def post(self, path: str, body: dict) -> list[dict]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": self.auth},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def run(orch: Path, env: dict[str, str], extra: list[str]) -> float:
    orch.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=orch, check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [RLHF, "run", "infra=server", "tracking=server", *FAST, *extra],
        cwd=orch,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"rlhf run failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def task_times(api: Prefect, since: float) -> dict[str, float]:
    """The orchestrator's task wall time per stage task, for task runs started after `since`."""
    out = {}
    for t in api.post("/task_runs/filter", {"limit": 200}):
        name = t["name"].rsplit("-", 1)[0]
        if name in STAGES and ts(t["start_time"]) > since and t["end_time"]:
            out[name] = ts(t["end_time"]) - ts(t["start_time"])
    return out


def dispatched_breakdown(api: Prefect, env: dict[str, str], since: float) -> dict[str, dict[str, float]]:
    """Per stage flow run: scheduled -> running (a worker picks it up and starts the process), its run time,
    and the stage's own MLflow run duration (the rest of the flow run is setup, downloads and upload)."""
    import mlflow

    creds = services.read_env_file(Path(env["RLHF_CREDENTIALS_FILE"]))
    os.environ.update({k: creds[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    flows = {f["id"]: f["name"] for f in api.post("/flows/filter", {"limit": 200})}
    out = {}
    for fr in api.post("/flow_runs/filter", {"limit": 200}):
        stage = next((s for s, f in STAGES.items() if flows.get(fr["flow_id"]) == f), None)
        if stage is None or ts(fr["expected_start_time"]) < since:
            continue
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"tags.`rlhf.flow_run_id` = '{fr['id']}'"
        )
        body = (runs[0].info.end_time - runs[0].info.start_time) / 1000 if runs else float("nan")
        flow_s = ts(fr["end_time"]) - ts(fr["start_time"])
        out[stage] = {
            "pickup_s": ts(fr["start_time"]) - ts(fr["expected_start_time"]),
            "flow_run_s": flow_s,
            "stage_mlflow_run_s": body,
            "worker_setup_and_upload_s": flow_s - body,
        }
    return out


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rlhf-dispatch-bench-"))
    layout = services.Layout(root / "services")
    services.up(layout, services.Ports(free_port(), free_port(), free_port()))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RLHF_"))}
    env = base | services.read_env_file(layout.endpoints)
    (root / "worker").mkdir()
    worker = subprocess.Popen(
        [RLHF, "worker", "--pool", "gpu"],
        cwd=root / "worker",
        env=env,
        stdout=open(root / "worker.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = Prefect(env)
    try:
        time.sleep(10)  # the worker registers with the server
        t_local = time.time()
        wall_local = run(root / "orch-local", env, ["infra.training_pool=null"])
        local = task_times(api, t_local)
        t_remote = time.time()
        wall_remote = run(root / "orch-remote", env, [])
        remote = task_times(api, t_remote)
        breakdown = dispatched_breakdown(api, env, t_remote)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        services.down(layout)
    per_stage = {
        s: {
            "in_process_s": round(local.get(s, float("nan")), 2),
            "dispatched_s": round(remote.get(s, float("nan")), 2),
            "overhead_s": round(remote.get(s, float("nan")) - local.get(s, float("nan")), 2),
            **{k: round(v, 2) for k, v in breakdown.get(s, {}).items()},
        }
        for s in STAGES
    }
    result = {
        "what": "seconds a stage dispatched to a `process` worker on pool gpu adds vs in-process (same servers)",
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "worker_poll_s": 2.0,
        "pipeline_wall_s": {"in_process": round(wall_local, 1), "dispatched": round(wall_remote, 1)},
        "per_stage": per_stage,
        "mean_overhead_s": round(sum(v["overhead_s"] for v in per_stage.values()) / len(per_stage), 2),
    }
    print(f"{'stage':14} {'in-process':>10} {'dispatched':>10} {'overhead':>9} {'pickup':>7} {'setup+upload':>12}")
    for s, v in per_stage.items():
        print(
            f"{s:14} {v['in_process_s']:10.1f} {v['dispatched_s']:10.1f} {v['overhead_s']:9.1f} "
            f"{v.get('pickup_s', float('nan')):7.1f} {v.get('worker_setup_and_upload_s', float('nan')):12.1f}"
        )
    print(
        f"pipeline: in process {wall_local:.0f} s, dispatched {wall_remote:.0f} s; mean overhead per stage "
        f"{result['mean_overhead_s']:.1f} s"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
