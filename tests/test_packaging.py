"""Issue 39: the packaged defaults. A wheel built from this repository carries conf/ (every Hydra YAML, nested
groups such as conf/ppo/guide/ included) and installs it beside components/, where components/config.py's CONF_DIR
looks: installed with pip in a fresh virtual environment outside the repository, `rlhf config` composes the same
config as the source tree from an empty directory, and `rlhf init DIR` makes a project in which `rlhf config` works.

The development venv's editable install reads conf/ from the source tree and so hides a file the wheel lacks; here
only the wheel is installed. The dependencies are not installed (no network, and minutes): the fresh venv sees the
development venv's site-packages through a path in a .pth file. The .pth files of a directory named that way are
not processed, so the editable install's finder is not loaded; the test checks that `cli` and `components` are
imported from the fresh venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not copied to the build tree: what .gitignore keeps out of the repository at its root, and hidden entries
# (.venv, .git, caches)
_NOT_SOURCES = {"build", "dist", "data", "outputs", "multirun", "mlruns", "mlartifacts", "node_modules"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n == "__pycache__"}
    if Path(directory) == REPO:
        ignored |= {n for n in names if n.startswith(".") or n in _NOT_SOURCES or n.endswith(".egg-info")}
    return ignored


def _run(cmd: list, cwd: Path, env: dict[str, str]) -> str:
    """Run `cmd`; its stdout. A failure's message holds the command, its directory and all it printed."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"`{' '.join(args)}` in {cwd} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc.stdout


def test_wheel_carries_the_config(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # nothing from the repo

    # The wheel, built from a copy of the sources: setuptools writes build/ and *.egg-info into the tree it builds
    # (a stale build/lib would package modules deleted since, and two runs would race in the repository).
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels, src], tmp_path, env)
    (wheel,) = wheels.glob("rlhf_ops-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n for n in zf.namelist() if n.startswith("conf/")}
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert not expected - packaged, f"not in the wheel: {sorted(expected - packaged)}"

    # A fresh venv outside the repository with the wheel alone installed, then the dependencies made visible
    # (after the install: pip must not see the development venv's rlhf-ops as installed already).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp_path, env)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(_run([python, "-c", purelib], tmp_path, env).strip()).resolve()
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site_packages / "rlhf-ops-test-deps.pth").write_text("".join(f"{d}\n" for d in deps))

    work = tmp_path / "work"  # an empty directory: not a project, not the repository
    work.mkdir()
    where = _run(
        [
            python,
            "-c",
            "import cli, components, components.config as c; print(cli.__file__, components.__file__, c.CONF_DIR)",
        ],
        work,
        env,
    ).split()
    assert [Path(p).resolve() for p in where] == [
        site_packages / "cli" / "__init__.py",
        site_packages / "components" / "__init__.py",
        site_packages / "conf",
    ], "not the wheel's code and conf/"

    # `rlhf config` from the wheel composes what the source tree composes, nested groups included
    rlhf = venv / "bin" / "rlhf"
    source_rlhf = [sys.executable, "-m", "cli.main"]  # the editable install: conf/ of the source tree
    outputs = {}
    for args in (("config",), ("config", "ppo/guide=rollin", "policy=grpo"), ("config", "--options")):
        outputs[args] = _run([rlhf, *args], work, env)
        assert outputs[args] == _run([*source_rlhf, *args], work, env), f"`rlhf {' '.join(args)}`: wheel != source"
    assert "n_demonstrations:" in outputs[("config",)]
    assert "ppo/guide: " in outputs[("config", "--options")]

    # `rlhf init DIR`: a project, in which `rlhf config` composes DIR/rlhf.yaml on the packaged defaults
    _run([rlhf, "init", "proj"], work, env)
    proj = work / "proj"
    assert (proj / "rlhf.yaml").is_file()
    assert (proj / "data").is_dir()
    assert (proj / ".dvc").is_dir()
    assert "n_demonstrations:" in _run([rlhf, "config"], proj, env)
