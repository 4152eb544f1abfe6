"""The layout's arrows (docs/architecture.md, "Layout"): cli -> flows -> components, cli and flows -> service,
service -> components; components import none of the others, and no module imports itself back through others.
Read from the source (every import, module level or inside a function), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "flows", "service", "components")
ALLOWED = {  # package -> the packages of ours it may import
    "cli": {"cli", "flows", "service", "components"},
    "flows": {"flows", "service", "components"},
    "service": {"service", "components"},
    "components": {"components"},
}


def imports() -> dict[str, set[str]]:
    """module (dotted) -> the modules of ours it imports."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{a.name}" for a in node.names}  # `from flows import stages`
            graph[module] = {m for m in found if m.split(".")[0] in PACKAGES and m in _modules()}
    return graph


def _modules() -> set[str]:
    out = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            out.add(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"))
    return out


def test_arrows_run_one_way_between_the_packages():
    wrong = [
        f"{m} imports {i}"
        for m, targets in imports().items()
        for i in targets
        if i.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = imports()
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if n == m or n.split(".")[0] != m.split(".")[0] and n not in graph:
                continue
            if state.get(n) == "open":
                circles.append(" -> ".join(path[path.index(n) :] + [n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


# the entrypoints that deployments stored by earlier versions name (`rlhf deploy`: flows.pool.<fn>; `rlhf serve`:
# the retrain-service flow): the layout change kept every flow in its module, so they load as they are
STORED_ENTRYPOINTS = (
    "flows.pool.base_stage",
    "flows.pool.sft_stage",
    "flows.pool.reward_model_stage",
    "flows.pool.ppo_stage",
    "flows.pool.rejection_sampling_stage",
    "flows.pool.grpo_stage",
    "flows.pool.rloo_stage",
    "flows.pool.dpo_stage",
    "flows.pool.kto_stage",
    "flows.pool.evaluate_stage",
    "flows.serve.retrain_service",
)


def test_entrypoints_of_stored_deployments_still_load():
    import importlib

    from flows import pool

    for entrypoint in STORED_ENTRYPOINTS:
        module, _, name = entrypoint.rpartition(".")
        assert hasattr(getattr(importlib.import_module(module), name), "fn"), f"{entrypoint} is not a Prefect flow"
    written = {f"{pool.__name__}.{f.fn.__name__}" for f in pool.STAGE_FLOWS.values()}  # what `deploy` writes now
    assert written == {e for e in STORED_ENTRYPOINTS if e.startswith("flows.pool.")}
