"""Issue 28, item 9: what a machine keeps on disk stays bounded. Downloaded inputs (`<state>/inputs/`) beyond the
most recently used, never one a stage is reading; a killed download's leftovers; launch dirs of processes that
are gone (they hold the operator's overrides). Real MLflow (SQLite) artifacts, real processes."""

import os
import subprocess
import sys
import time

import mlflow

from components import tracking
from components.owner import HOST, Owner, _start_time
from flows.locations import INPUTS, INPUTS_PER_STAGE_OUTPUT, inputs_in_use, prune_inputs
from service.launch import OWNER_FILE, STALE_LAUNCH_DIR_S, prune_launch_dirs
from tests.conftest import make_project


def logged_outputs(n: int) -> list[str]:
    """n finished runs, each with an `output/` artifact: -> their runs:/ URIs."""
    uris = []
    for i in range(n):
        with mlflow.start_run() as run:
            mlflow.log_text(f"weights {i}", "output/model/weights.txt")
        uris.append(f"runs:/{run.info.run_id}/output/model")
    return uris


def test_downloaded_inputs_beyond_the_most_recent_are_pruned_but_never_one_in_use(tmp_path):
    cfg = make_project(tmp_path / "proj", "infra.keep_stage_outputs=1")  # keeps 1 x INPUTS_PER_STAGE_OUTPUT
    tracking.setup(cfg)
    uris = logged_outputs(INPUTS_PER_STAGE_OUTPUT + 2)
    root = cfg.state_path / INPUTS
    with inputs_in_use(cfg, {"oldest": uris[0]}) as held:  # a stage still reading the first input
        assert open(os.path.join(held["oldest"], "weights.txt")).read() == "weights 0"
        for uri in uris[1:]:
            time.sleep(0.01)  # distinct use times
            with inputs_in_use(cfg, {"x": uri}):
                pass
        leftover = root / f".download-{uris[1].replace(':/', '/').replace('/', '__')}-abc123"
        leftover.mkdir()  # what a download killed midway leaves
        removed = prune_inputs(cfg)
        assert len(removed) == 1 and removed[0].endswith(uris[1].split("/")[1] + "__output__model"), removed
        assert os.path.exists(held["oldest"]), "an input in use is never pruned"
        assert not leftover.exists()
    assert len(prune_inputs(cfg)) == 1, "released, the oldest input goes too"
    kept = sorted(p.name for p in root.glob("*.complete"))
    assert len(kept) == INPUTS_PER_STAGE_OUTPUT
    with inputs_in_use(cfg, {"again": uris[0]}) as again:  # pruned, then needed again: downloaded again
        assert open(os.path.join(again["again"], "weights.txt")).read() == "weights 0"


def test_launch_dirs_of_processes_that_are_gone_are_removed(tmp_path):
    root = tmp_path / "launch"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = Owner(HOST, proc.pid, _start_time(proc.pid))
    proc.wait()
    dirs = {name: root / name for name in ("dead", "alive", "other-host-new", "other-host-old", "no-owner-old")}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "spec.json").write_text('{"overrides": ["infra.dvc_remote_url=s3://bucket"]}')
    (dirs["dead"] / OWNER_FILE).write_text(str(dead))
    (dirs["alive"] / OWNER_FILE).write_text(str(Owner.me()))
    (dirs["other-host-new"] / OWNER_FILE).write_text("another-host:12:1.00")
    (dirs["other-host-old"] / OWNER_FILE).write_text("another-host:12:1.00")
    old = time.time() - STALE_LAUNCH_DIR_S - 60
    for name in ("other-host-old", "no-owner-old"):
        os.utime(dirs[name], (old, old))
    removed = {d.name for d in prune_launch_dirs(root)}
    assert removed == {"dead", "other-host-old", "no-owner-old"}
    assert dirs["alive"].exists() and dirs["other-host-new"].exists()
