"""`rlhf init [DIR]`: a project directory of the user's own, as `git init` / `dvc init` make theirs.

It holds the contracts' data folders (empty: the first `rlhf ingest` starts the data set), a DVC repo with its local
remote, `rlhf.yaml` (the project's settings on top of the packaged defaults: components/config.compose_project), a
`.gitignore` for the state dir and a README that says what goes where. Nothing is trained or generated here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from components.config import PROJECT_FILE, Config, compose_project
from components.data.schemas import KINDS

MARKERS = (PROJECT_FILE, "data.dvc", ".dvc")  # what makes a directory a project already


class InitRefused(Exception):
    """The project cannot be made there, or with that model; nothing was left behind."""


class ProjectExists(InitRefused):
    """The directory already holds a project (or its DVC repo)."""


@dataclass
class Project:
    root: Path
    files: list[Path]  # what init wrote, for the command to show
    cfg: Config  # the project's config, composed with its rlhf.yaml


def rlhf_yaml(name: str, model: Path | str | None, demo: bool) -> str:
    """The project file: group choices, then what differs from the packaged defaults, each line commented."""
    if model is None:
        model_part = (
            "  - model: tiny          # the demo base (a tiny Llama built on this machine): `rlhf init --model DIR`\n"
            "                         #   or `model.name_or_path:` below for your own\n"
        )
        values = ""
    else:
        model_part = ""
        values = (
            "model:\n"
            f"  name: {_yaml_str(Path(str(model)).name or str(model))}\n"
            f"  name_or_path: {_yaml_str(str(model))}   # a local directory, or a hub id in the local cache\n"
            "  build_demo_base: false\n"
            "  # dtype: bfloat16       # on a GPU\n"
        )
    data = (
        "  - data: demo_small     # the seeded demo data set (forum-sized); `data: own` for your own\n"
        if demo
        else "  - data: own            # your data: started and grown by `rlhf ingest FILE --kind K`\n"
    )
    return (
        "# This project's settings, on top of rlhf-ops' packaged defaults. `rlhf config` prints the whole config,\n"
        "# `rlhf config --options` the options of each group; any key=value on the command line overrides this file.\n"
        "# Reference: docs/configuration.md. Values may read the environment: ${oc.env:VAR,default}.\n"
        "defaults:\n"
        f"{data}{model_part}"
        f"{values}"
        "tracking:\n"
        f"  experiment: {_yaml_str(name)}\n"
        f"  registered_model_name: {_yaml_str(name)}\n"
        "gate:                     # what a candidate must do to be registered and promoted (docs/configuration.md)\n"
        "  min_win_rate: 0.52      # share of eval prompts where the reward model prefers it to the champion\n"
        "  approval: auto          # manual: a person approves each promotion (`rlhf approve`)\n"
        "# The server profile (`rlhf services up`, docs/operating.md): shared MLflow, Prefect and a DVC remote.\n"
        "# Uncomment to use it; the URLs come from the environment the services command prints.\n"
        "# defaults:\n"
        "#   - infra: server\n"
        "#   - tracking: server\n"
        "# infra:\n"
        "#   dvc_remote_url: ${oc.env:RLHF_DVC_REMOTE}\n"
        "#   prefect_api_url: ${oc.env:PREFECT_API_URL}\n"
    )


def _yaml_str(s: str) -> str:
    import json

    return json.dumps(s)  # a JSON string is a YAML string: any path or name, quoted


README = """# {name}: an rlhf-ops project

Your data, your model, retrained as feedback arrives. The walk-through: docs/quickstart.md of rlhf-ops.

| put here (with `rlhf ingest FILE --kind K`)  | kind            | one JSON object per line                         |
|----------------------------------------------|-----------------|--------------------------------------------------|
| what good answers look like                  | demonstrations  | {{"id", "prompt", "response"}}                     |
| which of two answers is better               | preferences     | {{"id", "prompt", "chosen", "rejected"}}           |
| prompts the policy practises on              | prompts         | {{"id", "prompt"}}                                 |
| prompts the gate compares models on (frozen) | eval            | {{"id", "prompt"}} (one batch: then frozen)        |
| thumbs on answers (also from serving)        | feedback        | {{"id", "prompt", "response", "label": 1 or 0}}    |

`rlhf ingest` validates each batch (the rules: docs/data.md) and versions it in `data.dvc`; never write into
`data/` by hand. Then `rlhf run` trains, gates and promotes; `rlhf model serve` serves the champion.

- `rlhf.yaml`: this project's settings (model, data, gate, servers) on top of the packaged defaults.
- `data/`, `data.dvc`: the data and its version (DVC; commit `data.dvc` with git).
- `.rlhf/`: local state (MLflow store, DVC remote, caches); not for git.
"""

GITIGNORE = "/.rlhf/\n/data\n__pycache__/\n"


def init_project(root: Path, model: str | None = None, demo: bool = False) -> Project:
    """Make `root` a project. InitRefused (ProjectExists) when it already is one or the model is not there;
    ConfigError when the file would not compose. On any failure, what it wrote is removed again."""
    from components.config import compose
    from components.models.fit import model_dir

    root = root.expanduser().resolve()
    if root.is_file():
        raise InitRefused(f"{root} is a file: name a new or empty directory for the project")
    if found := [m for m in MARKERS if (root / m).exists()]:
        raise ProjectExists(
            f"{root} already holds a project ({', '.join(found)}): use it as it is, or name another directory"
        )
    if model is not None:
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        _, problem = model_dir(replace(compose([]).model, name_or_path=model, build_demo_base=False))
        if problem:
            raise InitRefused(f"--model: {problem}")
    made_root = not root.exists()
    before = {p.name for p in root.iterdir()} if root.exists() else set()
    try:
        return _init(root, model, demo)
    except BaseException:
        if made_root:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for p in root.iterdir():
                if p.name not in before:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _init(root: Path, model: str | None, demo: bool) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in (
        (root / PROJECT_FILE, rlhf_yaml(root.name, model, demo)),
        (root / "README.md", README.format(name=root.name)),
    ):
        if path.exists():  # a README of the user's own: kept
            continue
        path.write_text(text)
        written.append(path)
    ignore = root / ".gitignore"
    have = ignore.read_text().splitlines() if ignore.exists() else []
    if lacking := [line for line in GITIGNORE.splitlines() if line not in have]:  # state and secrets never in git
        ignore.write_text("".join(f"{line}\n" for line in [*have, *lacking]))
        written.append(ignore)
    cfg = compose_project([f"root={root}"])
    for kind in KINDS:
        (cfg.data_path / kind).mkdir(parents=True, exist_ok=True)
    from components.data.versioning import open_repo

    open_repo(cfg)  # `dvc init` and the remote (<state>/dvc-remote unless infra.dvc_remote_url says otherwise)
    return Project(root, [*written, cfg.data_path, root / ".dvc"], cfg)
