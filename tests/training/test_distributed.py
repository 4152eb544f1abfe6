"""Data-parallel stages on CPU (gloo): the collectives by hand under a real 2-process group, then SFT, the reward
model and PPO launched as 2 processes by torchrun (service/launch.py) against 1 process at the same global batch.

Tolerances, stated: SFT (accelerate splits each global batch between the ranks, the loss averages over all their
tokens) and the reward model (each rank half of every step's examples, the gradients averaged) see the same
examples per step as one process, so their training losses agree to float rounding: 1e-3 relative (SFT's held-out
loss is measured per rank: 0.5%). PPO's ranks sample their
own rollouts (other draws than one process's), so 2 processes are a different sample of the same training: the
final held-out reward within 0.5 RM std units and KL within a factor 2 of one process's, the same metric keys,
and the replicas identical at the end (`train_ppo` checks it)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from components import tracking
from components.config import compose
from components.training import distributed
from components.training.ppo import whiten_across_ranks
from components.training.ppo_math import whiten
from service import launch

# ---------------------------------------------------------------------------- collectives, by hand


def _collectives(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    os.environ["WORLD_SIZE"] = str(world)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    w = distributed.world()
    p, unused = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([3.0, 4.0])
    if rank == 1:
        unused.grad = torch.tensor([2.0, 2.0])  # rank 0 has no gradient for it: it counts as zeros
    (loss,) = distributed.all_reduce_gradients([p, unused], torch.tensor(1.0 if rank == 0 else 3.0))
    row = {"a": 1.0, "tps": 10.0, "opt": 5.0} if rank == 0 else {"a": 3.0, "tps": 30.0}
    reduced = distributed.reduce_metrics(row, optional=("opt", "none"), sum_keys=("tps",))
    g = torch.Generator().manual_seed(0)
    xs, masks = torch.randn(4, 3, generator=g), (torch.rand(4, 3, generator=g) > 0.3).float()
    mine = slice(2 * rank, 2 * rank + 2)
    white = whiten_across_ranks(xs[mine], masks[mine])
    gathered = distributed.gather_tensor(torch.tensor([float(rank)]))
    out = {
        "world": [w.rank, w.size],
        "grad": p.grad.tolist(),
        "unused": unused.grad.tolist(),
        "loss": loss.item(),
        "reduced": reduced,
        "white_err": (white - whiten(xs, masks)[mine]).abs().max().item(),
        "gathered": gathered.tolist(),
        "any": [distributed.any_rank(rank == 1), distributed.any_rank(False)],
        "shard": distributed.shard(list(range(6)), w),
    }
    Path(out_dir, f"{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_collectives_average_gradients_and_metrics_by_hand(tmp_path):
    torch.multiprocessing.spawn(_collectives, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == [0, 2] and r1["world"] == [1, 2]
    for r in (r0, r1):
        assert r["grad"] == [2.0, 3.0]  # ([1, 2] + [3, 4]) / 2 on both ranks
        assert r["unused"] == [1.0, 1.0]  # ([0, 0] + [2, 2]) / 2
        assert r["loss"] == 2.0
        # mean of a; tps summed; opt only on rank 0: its own value; "none" on no rank: left out
        assert r["reduced"] == {"a": 2.0, "tps": 40.0, "opt": 5.0}
        assert r["white_err"] < 1e-5  # whitened with the whole batch's moments, as one process would
        assert r["gathered"] == [0.0, 1.0]
        assert r["any"] == [True, False]
    assert r0["shard"] == [0, 1, 2] and r1["shard"] == [3, 4, 5]


def test_a_batch_the_processes_do_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ppo.batch_size=5 is not divisible by the 2 processes"):
        distributed.per_rank(5, "ppo.batch_size", distributed.World(0, 2))
    assert distributed.per_rank(8, "x", distributed.World(1, 2)) == 4


def test_launch_settings_are_checked_before_anything_runs(tmp_path):
    base = [f"root={tmp_path}"]
    with pytest.raises(ValueError, match="infra.launcher='mpi'"):
        launch.check(compose([*base, "infra.launcher=mpi", "infra.num_processes=2"]))
    with pytest.raises(ValueError, match="main_process_ip"):
        launch.check(compose([*base, "infra.num_machines=2"]))
    with pytest.raises(ValueError, match="runs on one process"):
        launch.check(compose([*base, "policy=rejection_sampling", "infra.num_processes=2"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPUs only"):
            launch.check(compose([*base, "infra.launcher=accelerate", "infra.num_processes=2"]))


# torchrun's stand-in: it starts its rank in a session of its own, as torchrun does; the rank is launch.main's first step
LAUNCHER = """
import subprocess, sys, time
rank = "from service.launch import die_with_parent; die_with_parent(); import time; time.sleep(120)"
p = subprocess.Popen([sys.executable, "-c", rank], start_new_session=True)
open(sys.argv[1], "w").write(str(p.pid))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie nobody reaped is dead


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_sigkilled_caller_takes_its_launcher_and_ranks_with_it(tmp_path):
    """Found by SIGKILLing `rlhf run infra.num_processes=2` in PPO: the ranks, in torchrun's own sessions, trained
    on to the end. Now the launcher (started as `run` starts it) dies with its caller, and each rank with the
    launcher."""
    ranks = tmp_path / "rank.pid"
    launcher = [sys.executable, "-c", LAUNCHER, str(ranks)]
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; "
            f"subprocess.run([sys.executable, '-m', 'service.launch', '--exec', str(os.getpid()), *{launcher!r}])",
        ],
        cwd=Path(launch.__file__).resolve().parents[1],
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while not (ranks.exists() and ranks.read_text()):
            assert time.time() < deadline and caller.poll() is None, "the launcher never started its rank"
            time.sleep(0.05)
        rank = int(ranks.read_text())
        time.sleep(1.0)  # the rank is past die_with_parent()
        assert _alive(rank)
        caller.send_signal(signal.SIGKILL)  # the caller alone, as the OOM killer picks one process
        caller.wait()
        deadline = time.time() + 10
        while _alive(rank) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(rank), "the rank outlived its caller"
    finally:
        for pid in (caller.pid, int(ranks.read_text() or 0) if ranks.exists() else 0):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(caller.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_launcher_whose_caller_died_while_it_started_does_not_run():
    """Issue 28, item 12: the caller names itself on the command line. A launcher whose parent is no longer that
    caller (it died during the launcher's imports) exits at once instead of running unwatched."""
    proc = subprocess.run(
        [sys.executable, "-m", "service.launch", "--exec", "999999999", sys.executable, "-c", "print('ran')"],
        cwd=Path(launch.__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "ran" not in proc.stdout, (proc.stdout, proc.stderr)


def test_launcher_command_lines(tmp_path):
    spec = tmp_path / "spec.json"
    one = launch.command(compose([f"root={tmp_path}", "infra.num_processes=4"]), spec)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone", "-m", "service.launch"] + [
        str(spec)
    ]
    nodes = launch.command(
        compose(
            [
                f"root={tmp_path}",
                "infra.num_processes=8",
                "infra.num_machines=2",
                "infra.machine_rank=1",
                "infra.main_process_ip=10.0.0.5",
            ]
        ),
        spec,
    )
    assert "--nnodes=2" in nodes and "--node-rank=1" in nodes and "--master-addr=10.0.0.5" in nodes
    fsdp = launch.command(
        compose(
            [f"root={tmp_path}", "infra.launcher=accelerate", "infra.num_processes=4", "infra.accelerate_config=fsdp"]
        ),
        spec,
    )
    assert "--num_processes=4" in fsdp and any(a.endswith("conf/accelerate/fsdp.yaml") for a in fsdp)
    with pytest.raises(ValueError, match="not a file"):
        launch.accelerate_config_path("nope")


# ---------------------------------------------------------------------------- stages: 2 processes vs 1


def stage_cfg(stages, processes: int, *overrides: str):
    return compose([f"root={stages.root}", f"infra.num_processes={processes}", *overrides])


def close(a: float, b: float, rel: float = 1e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


SFT = ("sft.max_steps=6", "sft.batch_size=8", "sft.save_steps=100")


def test_sft_on_two_processes_matches_one(stages, tmp_path):
    one = launch.run("sft", stage_cfg(stages, 1, *SFT), **_sft_args(stages, tmp_path / "one"))
    two = launch.run("sft", stage_cfg(stages, 2, *SFT), **_sft_args(stages, tmp_path / "two"))
    assert two.metrics["sft/world_size"] == 2.0 and one.metrics["sft/world_size"] == 1.0
    m1, m2 = one.metrics, two.metrics
    assert close(m1["sft/train_loss"], m2["sft/train_loss"]), (m1, m2)  # the same examples, averaged alike
    # the held-out loss is measured a little differently on 2 ranks (each rank's batch mean, the last uneven batch
    # padded with repeats): 0.5%; what training gained on it agrees within 25%
    for key in ("sft/eval_loss", "sft/eval_loss_base"):
        assert close(m1[key], m2[key], rel=5e-3), (key, m1[key], m2[key])
    gain1, gain2 = m1["sft/eval_loss_base"] - m1["sft/eval_loss"], m2["sft/eval_loss_base"] - m2["sft/eval_loss"]
    assert gain1 > 0 and abs(gain1 - gain2) < 0.25 * gain1, (gain1, gain2)
    assert set(one.metrics) == set(two.metrics)
    assert (Path(two.merged_dir) / "model.safetensors").exists()  # rank 0 wrote the outputs


def _sft_args(stages, out: Path) -> dict:
    return {"base_path": stages.base_dir, "data_dir": str(stages.cfg.data_path), "out_dir": str(out)}


RM = ("reward.max_steps=6", "reward.batch_size=8", "reward.feedback_batch_size=8", "reward.stats_max_responses=64")


def test_reward_model_on_two_processes_matches_one(stages, tmp_path):
    args = {"sft_dir": stages.sft_dir, "data_dir": str(stages.cfg.data_path)}
    one = launch.run("reward", stage_cfg(stages, 1, *RM), **args, out_dir=str(tmp_path / "one"))
    two = launch.run("reward", stage_cfg(stages, 2, *RM), **args, out_dir=str(tmp_path / "two"))
    assert set(one.metrics) == set(two.metrics)
    for key in ("rm/eval_loss", "rm/eval_accuracy", "rm/feedback_loss", "rm/reward_mean", "rm/reward_std"):
        assert close(one.metrics[key], two.metrics[key]), (key, one.metrics[key], two.metrics[key])


PPO = (
    "ppo.steps=4",
    "ppo.batch_size=16",
    "ppo.minibatch_size=8",
    "ppo.eval_max_prompts=32",
    "ppo.save_every=2",
    "ppo.sample_every=2",
)


def test_ppo_on_two_processes_trains_like_one_and_only_rank_0_logs(stages, reward, tmp_path):
    tracking.setup(stages.cfg)  # the tracking store and experiment (an earlier test may have left another active)
    args = {"sft_dir": stages.sft_dir, "reward_dir": reward.head_dir, "data_dir": str(stages.cfg.data_path)}
    with mlflow.start_run() as run_one:
        one = launch.run("ppo", stage_cfg(stages, 1, *PPO), **args, out_dir=str(tmp_path / "one"))
    with mlflow.start_run() as run:
        two = launch.run("ppo", stage_cfg(stages, 2, *PPO), **args, out_dir=str(tmp_path / "two"))
    assert set(one.metrics) == set(two.metrics)
    assert two.metrics["ppo/world_size"] == 2.0 and one.metrics["ppo/world_size"] == 1.0
    for m in (one.metrics, two.metrics):
        assert all(math.isfinite(m[k]) for k in ("ppo/eval_reward", "ppo/eval_kl", "ppo/policy_loss")), m
    assert abs(one.metrics["ppo/eval_reward"] - two.metrics["ppo/eval_reward"]) < 0.5
    assert two.metrics["ppo/eval_kl"] < 2 * one.metrics["ppo/eval_kl"] + 1.0
    # rank 0 alone logged to the stage's run: the same points as one process (each iteration's row, then the
    # final metrics at the last step), the same sample tables
    client = mlflow.MlflowClient()
    for key in ("ppo/kl", "ppo/policy_loss", "ppo/eval_reward"):
        steps = [sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) for r in (run_one, run)]
        assert steps[0] == steps[1] and steps[0], (key, steps)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "ppo/world_size")] == [2.0] * 5
    tables = [[a.path for a in client.list_artifacts(r.info.run_id, "ppo/samples")] for r in (run_one, run)]
    assert len(tables[1]) == 2 and len(tables[0]) == 2, tables
    assert (tmp_path / "two" / "final" / "policy" / "adapter_model.safetensors").exists()

    # a run resumes on another world size: 1 process picks up 2 processes' last checkpoint
    more = launch.run("ppo", stage_cfg(stages, 1, *PPO, "ppo.steps=5"), **args, out_dir=str(tmp_path / "two"))
    assert more.metrics["ppo/resumed_from_iteration"] == 4.0
    assert len(more.history) == 5
