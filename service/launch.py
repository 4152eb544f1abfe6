"""A training stage as a multi-process job: torchrun or `accelerate launch`, never a launcher of our own.

`run(stage, cfg, **args)` trains SFT, the reward model or PPO: in this process when `infra.num_processes` is 1,
else as `infra.num_processes` processes per machine (`infra.num_machines` machines) started by `infra.launcher`:

    torchrun     torch's elastic launcher (the default): DDP on CPU (gloo) or GPU (nccl); one machine: --standalone
    accelerate   `accelerate launch`, with `infra.accelerate_config` (a file in conf/accelerate/, or a path): DDP,
                 FSDP or DeepSpeed ZeRO-2/3 for SFT (TRL's trainer reads it); GPUs only (accelerate starts several
                 CPU processes only through MPI)

Whoever runs the stage launches it: the retrain flow's process on the local profile, the worker's flow run with a
work pool (flows/dispatch.py). Each process runs this module's `main` on a spec file (`<state>/launch/<id>/spec.json`:
the stage, the config's overrides, the inputs, the MLflow run to log to): it composes the same config, joins the
process group (components/training/distributed.py) and calls the stage's component. Rank 0 logs to the stage's
MLflow run (the caller's, resumed by id) and writes the result; a rank that fails writes its error, and the caller
raises it (a diverged PPO run stays a PPODivergence: not retried). torchrun stops the other ranks when one fails.

Several machines: every machine runs the same launcher command on the same spec with its `infra.machine_rank`;
the spec and the stage's outputs must be on storage they share (`infra.state_dir`). README, "Scale".
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.config import CONF_DIR, Config
from components.owner import Owner

LAUNCHERS = ("torchrun", "accelerate")


def _sft(cfg: Config, a: dict[str, str]):
    from components.training.sft import train_sft

    return train_sft(cfg.sft, cfg.model, a["base_path"], Path(a["data_dir"]), Path(a["out_dir"]), seed=cfg.seed)


def _reward(cfg: Config, a: dict[str, str]):
    from components.training.reward import train_reward

    return train_reward(
        cfg.reward,
        cfg.model,
        a["sft_dir"],
        Path(a["data_dir"]),
        Path(a["out_dir"]),
        seed=cfg.seed,
        data_cfg=cfg.data,
        warm_from=a.get("warm_from"),
    )


def _ppo(cfg: Config, a: dict[str, str]):
    from components.training.ppo import train_ppo

    return train_ppo(
        cfg.ppo,
        cfg.model,
        a["sft_dir"],
        a.get("reward_dir"),
        Path(a["data_dir"]),
        Path(a["out_dir"]),
        seed=cfg.seed,
        warm_from=a.get("warm_from"),
    )


STAGES = {"sft": _sft, "reward": _reward, "ppo": _ppo}
RESULTS = {  # how a result comes back from rank 0's JSON
    "sft": ("components.training.sft", "SFTResult"),
    "reward": ("components.training.reward", "RewardResult"),
    "ppo": ("components.training.ppo", "PPOResult"),
}


class StageFailed(RuntimeError):
    """A rank of a multi-process stage failed with an error that is not one of ours."""


def run(stage: str, cfg: Config, **args: str | None) -> Any:
    """Train `stage` (sft | reward | ppo) on `args` (its inputs and out_dir): in this process, or as the configured
    multi-process job. -> the component's result (SFTResult, RewardResult, PPOResult)."""
    check(cfg)
    if cfg.infra.num_processes * cfg.infra.num_machines == 1:
        return STAGES[stage](cfg, args)
    import mlflow

    prune_launch_dirs(cfg.state_path / "launch")
    run_dir = cfg.state_path / "launch" / uuid.uuid4().hex[:12]
    run_dir.mkdir(parents=True, mode=0o700)  # the spec holds the operator's overrides: readable by this user only
    (run_dir / OWNER_FILE).write_text(str(Owner.me()))
    active = mlflow.active_run()
    spec = {
        "stage": stage,
        "overrides": [*cfg.overrides, f"root={cfg.root_path}"],
        "args": {k: str(v) for k, v in args.items() if v is not None},
        "mlflow_run_id": active.info.run_id if active else None,
    }
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    (run_dir / "spec.json").chmod(0o600)
    cmd = command(cfg, run_dir / "spec.json")
    if cfg.infra.num_machines > 1:  # the other machines join with the same command, their own rank
        _announce_other_machines(cfg, cmd)
    try:
        # the ranks' output (progress bars, logs) goes to this terminal
        proc = subprocess.run(
            # the launcher dies with this process (named by pid: it may die while the launcher imports)
            [sys.executable, "-m", "service.launch", "--exec", str(os.getpid()), *cmd],
            cwd=cfg.root_path,
            env=_env(cfg, mlflow.get_tracking_uri()),
        )
        result = run_dir / "result.json"
        if proc.returncode != 0 or not result.exists():
            raise _error(stage, run_dir, proc.returncode, cmd)
        module, name = RESULTS[stage]
        return getattr(__import__(module, fromlist=[name]), name)(**json.loads(result.read_text()))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


OWNER_FILE = "owner"  # host:pid:start of the process that made a launch dir (components/owner.py)
STALE_LAUNCH_DIR_S = 24 * 3600  # a launch dir whose owner cannot be judged (another host) is removed after this


def prune_launch_dirs(root: Path) -> list[Path]:
    """Launch dirs of processes that are gone: `run` removes its own when it returns, a SIGKILL leaves it, and it
    holds the operator's overrides. Another host's (shared storage) is removed once older than a day."""
    removed = []
    for d in root.iterdir() if root.is_dir() else []:
        try:
            owner = Owner.parse((d / OWNER_FILE).read_text().strip())
            age_s = time.time() - d.stat().st_mtime
        except OSError:  # no owner written (an older version, or a dir made a moment ago): judged by age
            owner, age_s = None, time.time() - d.stat().st_mtime if d.exists() else 0.0
        alive = owner.alive() if owner else None
        if alive is False or (alive is None and age_s > STALE_LAUNCH_DIR_S):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def command(cfg: Config, spec: Path) -> list[str]:
    """The launcher's command line for a spec file (every machine runs it, each with its `infra.machine_rank`)."""
    infra = cfg.infra
    entry = ["-m", "service.launch", str(spec)]
    if infra.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={infra.num_processes}"]
        if infra.num_machines == 1:
            return [*cmd, "--standalone", *entry]  # a free port on this machine, no rendezvous to set up
        return [
            *cmd,
            f"--nnodes={infra.num_machines}",
            f"--node-rank={infra.machine_rank}",
            f"--master-addr={_main_ip(cfg)}",
            f"--master-port={infra.main_process_port}",
            *entry,
        ]
    if infra.launcher == "accelerate":
        port = infra.main_process_port if infra.num_machines > 1 else _free_port()
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            f"--num_processes={infra.num_processes * infra.num_machines}",  # accelerate counts all machines'
            f"--num_machines={infra.num_machines}",
            f"--machine_rank={infra.machine_rank}",
            f"--main_process_port={port}",
        ]
        if infra.num_machines > 1:
            cmd.append(f"--main_process_ip={_main_ip(cfg)}")
        if infra.accelerate_config:
            cmd.append(f"--config_file={accelerate_config_path(infra.accelerate_config)}")
        else:
            cmd.append("--multi_gpu")
        return [*cmd, *entry]
    raise ValueError(f"infra.launcher={infra.launcher!r}: expected one of {', '.join(LAUNCHERS)}")


def _announce_other_machines(cfg: Config, cmd: list[str]) -> None:
    import logging

    rank_flag = "--node-rank=" if cfg.infra.launcher == "torchrun" else "--machine_rank="
    log = logging.getLogger("rlhf.launch")
    for rank in range(1, cfg.infra.num_machines):
        other = [f"{rank_flag}{rank}" if a.startswith(rank_flag) else a for a in cmd]
        log.warning(
            "machine %d of %d: run `%s` there (the spec must be on storage it shares)",
            rank,
            cfg.infra.num_machines,
            " ".join(other),
        )


def accelerate_config_path(name: str) -> Path:
    """`infra.accelerate_config`: a file of conf/accelerate/ by name (`fsdp`, `deepspeed_zero3`) or a path."""
    path = CONF_DIR / "accelerate" / f"{name}.yaml"
    if path.is_file():
        return path
    if Path(name).expanduser().is_file():
        return Path(name).expanduser().resolve()
    known = sorted(p.stem for p in (CONF_DIR / "accelerate").glob("*.yaml"))
    raise ValueError(f"infra.accelerate_config={name!r}: not a file; use one of {', '.join(known)} or a path")


def check(cfg: Config) -> None:
    """The launch settings, checked before anything runs (a clear error, not a launcher's traceback)."""
    infra = cfg.infra
    if infra.num_processes < 1 or infra.num_machines < 1:
        raise ValueError("infra.num_processes and infra.num_machines must be at least 1")
    if not 0 <= infra.machine_rank < infra.num_machines:
        raise ValueError(f"infra.machine_rank={infra.machine_rank}: expected 0..{infra.num_machines - 1}")
    if infra.launcher not in LAUNCHERS:
        raise ValueError(f"infra.launcher={infra.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if infra.num_processes * infra.num_machines == 1:
        return
    if infra.launcher == "accelerate":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "infra.launcher=accelerate starts several processes on GPUs only (on CPU accelerate needs MPI): "
                "use infra.launcher=torchrun (DDP over gloo) or infra.num_processes=1"
            )
        if infra.accelerate_config:
            accelerate_config_path(infra.accelerate_config)
    if infra.num_machines > 1 and not infra.main_process_ip:
        raise ValueError("infra.num_machines > 1 needs infra.main_process_ip (the address of machine_rank 0)")
    if cfg.policy.algorithm != "ppo":
        raise ValueError(
            f"policy.algorithm={cfg.policy.algorithm} runs on one process: set infra.num_processes=1 "
            "(SFT, the reward model and PPO run data parallel)"
        )


def _main_ip(cfg: Config) -> str:
    if not cfg.infra.main_process_ip:
        raise ValueError("infra.num_machines > 1 needs infra.main_process_ip (the address of machine_rank 0)")
    return cfg.infra.main_process_ip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cfg: Config, tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)  # credentials included (environment or RLHF_CREDENTIALS_FILE, loaded into it)
    env["MLFLOW_TRACKING_URI"] = tracking_uri  # the caller's store, by the environment: never written to a file
    # each rank a share of the cores (torchrun's default is 1 thread per process)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.infra.num_processes)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def _error(stage: str, run_dir: Path, returncode: int, cmd: list[str]) -> Exception:
    """The first rank's own error, re-raised as its type where that is one of ours (PPODivergence, ValueError)."""
    errors = sorted(run_dir.glob("error-rank*.json"), key=lambda p: int(p.stem.removeprefix("error-rank")))
    if not errors:
        return StageFailed(
            f"{stage}: the launcher exited with {returncode} and no rank recorded an error: see the output above "
            f"({' '.join(cmd)})"
        )
    err = json.loads(errors[0].read_text())
    message = f"{err['message']} (rank {err['rank']} of {err['world_size']})"
    from components.training.ppo import PPODivergence

    ours = {e.__name__: e for e in (PPODivergence, ValueError, FileNotFoundError, FloatingPointError)}
    if err["type"] in ours:
        return ours[err["type"]](message)
    return StageFailed(f"{stage} failed on rank {err['rank']}: {err['type']}: {message}")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing). torchrun starts each rank in a session
    of its own, so a SIGKILL of the retrain's process group (an operator, the OOM killer) killed the launcher but
    not the ranks: they trained on, unseen, and raced the next run resuming the same stage directory.
    `parent`: the pid the caller gave on the command line. Read here instead, after this module's imports (about a
    second), a caller that died meanwhile would be missed: the pid read would already be its successor's."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the call: no signal will come
        os._exit(1)


def main(spec_path: str) -> None:
    """One rank of a launched stage."""
    die_with_parent()
    import torch

    from components.config import compose
    from components.models.loading import resolve_device
    from components.training import distributed

    run_dir = Path(spec_path).parent
    spec = json.loads(Path(spec_path).read_text())
    cfg = compose(spec["overrides"])
    w = distributed.init(cpu=resolve_device(cfg.model.device).type == "cpu")
    try:
        import mlflow

        if w.main and spec["mlflow_run_id"]:  # the store: MLFLOW_TRACKING_URI, set by the caller
            mlflow.start_run(run_id=spec["mlflow_run_id"])  # the caller's stage run: curves and tables go there
        result = STAGES[spec["stage"]](cfg, spec["args"])
        if w.main:
            tmp = run_dir / ".result.json"
            tmp.write_text(json.dumps(asdict(result)))
            os.replace(tmp, run_dir / "result.json")
    except Exception as e:
        error = {"type": type(e).__name__, "message": str(e), "rank": w.rank, "world_size": w.size}
        (run_dir / f"error-rank{w.rank}.json").write_text(json.dumps(error))
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--exec":  # `run` starts the launcher so: it dies with its caller, then its ranks with it
        die_with_parent(int(sys.argv[2]))
        os.execv(sys.argv[3], sys.argv[3:])
    main(sys.argv[1])
