"""The versions one serving process answers with (issue 41): the champion and, during a canary, the challenger.

    RLHF_MODEL_NAME          the registered model
    RLHF_CHAMPION_ALIAS      the alias (or version number) answering by default: `rlhf model serve --alias`
    RLHF_CHALLENGER_ALIAS    the canary's alias (`--challenger`, default `challenger`), "" for none
    RLHF_CANARY_SHARE        the share of users the challenger answers (`--share`, registry.canary.share)
    RLHF_CANARY_SHADOW       "1": the challenger answers every prompt too, traced, never shown (`--shadow`)
    RLHF_ALIAS_POLL_S        how often the aliases are re-read (registry.canary.poll_s)

The aliases are re-read on that poll, without a restart: a challenger that appears starts its canary (loaded first,
then routed to), one whose alias is removed (retired, rolled back) leaves traffic at the next poll, and a promotion
(champion moved) reaches users once the new champion is loaded. A request in flight finishes on the arm it started on:
it holds its arm. Each arm is MLflow's own scoring app for its version (`models:/NAME/VERSION`), loaded with its
serving limits; the served model traces and signs its answers with its version and arm.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from components.registry.routing import CHALLENGER, CHAMPION

SHADOW = "shadow"  # the challenger's arm in shadow mode: it answers every prompt, and no user sees it

log = logging.getLogger("rlhf.serving")


@dataclass(frozen=True)
class Arm:
    name: str  # champion | challenger | shadow
    version: str
    app: Any  # MLflow's scoring app (ASGI) for this version
    model: Any  # its pyfunc model
    max_body_bytes: int

    @property
    def tracer(self) -> Any:
        return getattr(self.model.unwrap_python_model(), "tracer", None)


def load_arm(name: str, version: str, alias: str, arm: str) -> Arm:
    """MLflow's scoring app for `models:/name/version`, tracing as `name/version@alias` on `arm`."""
    from mlflow.pyfunc import scoring_server

    from components.registry.policy_model import Limits

    os.environ["RLHF_SERVED_MODEL"] = f"{name}/{version}@{alias}"  # read by the model's Tracer as it loads
    os.environ["RLHF_SERVED_ARM"] = arm
    os.environ["RLHF_SHARE_BASE"] = "1"  # two versions on one base (a canary of an incremental retrain): loaded once
    model = scoring_server.load_model_with_mlflow_config(f"models:/{name}/{version}")
    tracer = getattr(model.unwrap_python_model(), "tracer", None)
    if tracer is not None:
        tracer.arm = arm  # a model logged before arms were traced: its tracer gets the attribute all the same
    limits = Limits.from_config({k: v for k, v in (model.model_config or {}).items() if k in Limits.names()})
    return Arm(arm, version, scoring_server.init(model), model, limits.max_body_bytes)


class Arms:
    """The champion and the challenger, re-resolved on a poll (see the module docstring)."""

    def __init__(
        self,
        name: str,
        champion_alias: str,
        challenger_alias: str = "",
        share: float = 0.1,
        shadow: bool = False,
        poll_s: float = 10.0,
        resolve: Callable[[str, str], str | None] | None = None,
        load: Callable[[str, str, str, str], Arm] = load_arm,
    ):
        from components.registry.registry import alias_version

        self.name, self.champion_alias, self.challenger_alias = name, champion_alias, challenger_alias
        self.share, self.shadow, self.poll_s = share, shadow, poll_s
        self.resolve = resolve or (lambda n, a: a if a.isdigit() else alias_version(n, a))
        self.load = load
        self.lock = threading.Lock()  # one refresh at a time
        self.champion: Arm | None = None
        self.challenger: Arm | None = None
        self.stopped = threading.Event()

    @classmethod
    def from_env(cls) -> Arms:
        return cls(
            os.environ["RLHF_MODEL_NAME"],
            os.environ.get("RLHF_CHAMPION_ALIAS", CHAMPION),
            os.environ.get("RLHF_CHALLENGER_ALIAS", ""),
            float(os.environ.get("RLHF_CANARY_SHARE", "0.1")),
            os.environ.get("RLHF_CANARY_SHADOW") == "1",
            float(os.environ.get("RLHF_ALIAS_POLL_S", "10")),
        )

    def current(self) -> tuple[Arm, Arm | None]:
        """The arms of now, read once by a request: it keeps them to its end."""
        champion, challenger = self.champion, self.challenger
        assert champion is not None, "Arms.refresh() loads the champion before serving"
        return champion, challenger

    def refresh(self) -> list[str]:
        """Re-read both aliases; load what changed, drop a challenger whose alias is gone: -> what changed."""
        changes = []
        with self.lock:
            champion = self.resolve(self.name, self.champion_alias)
            if champion is None and self.champion is None:
                raise LookupError(f"no version of {self.name} has the alias {self.champion_alias!r}")
            if champion is not None and (self.champion is None or self.champion.version != champion):
                if self.challenger is not None and self.challenger.version == champion:  # promoted: already loaded
                    loaded, self.challenger = replace(self.challenger, name=CHAMPION), None
                    if (tracer := loaded.tracer) is not None:
                        tracer.arm, tracer.alias = CHAMPION, self.champion_alias
                else:
                    loaded = self.load(self.name, champion, self.champion_alias, CHAMPION)
                before, self.champion = self.champion, loaded
                self.release_later(before)
                changes.append(
                    f"{CHAMPION} is v{champion}" + (f" (was v{before.version})" if before is not None else "")
                )
            wanted = self.resolve(self.name, self.challenger_alias) if self.challenger_alias else None
            if wanted is not None and self.champion is not None and wanted == self.champion.version:
                wanted = None  # the challenger was promoted: one arm again
            if wanted is None and self.challenger is not None:
                changes.append(f"{CHALLENGER} v{self.challenger.version} left traffic")
                self.release_later(self.challenger)
                self.challenger = None
            elif wanted is not None:
                # shadow: the process's --shadow, or the canary's phase (flows/canary.py moves it on to traffic)
                label = SHADOW if self.shadow or self.phase(wanted) == SHADOW else CHALLENGER
                how = "in shadow" if label == SHADOW else f"for {self.share:.0%} of users"
                if self.challenger is None or self.challenger.version != wanted:
                    self.release_later(self.challenger)
                    self.challenger = self.load(self.name, wanted, self.challenger_alias, label)
                    changes.append(f"{CHALLENGER} v{wanted} answers {how}")
                elif self.challenger.name != label:  # shadow passed: the same loaded model, now shown to users
                    if (tracer := self.challenger.tracer) is not None:
                        tracer.arm = label
                    self.challenger = replace(self.challenger, name=label)
                    changes.append(f"{CHALLENGER} v{wanted} answers {how}")
        for line in changes:
            log.warning("canary: %s", line)
        return changes

    RELEASE_AFTER_S = 60.0  # a request that took an arm just before it left still finishes on it

    def release_later(self, arm: Arm | None) -> None:
        """An arm that left: its adapters come off a shared base once requests that hold it are done."""
        if arm is None:
            return
        release = getattr(arm.model.unwrap_python_model(), "release", None)
        if release is not None:
            timer = threading.Timer(self.RELEASE_AFTER_S, release)
            timer.daemon = True
            timer.start()

    def phase(self, version: str) -> str:
        """The canary's phase, from the challenger version's tag (components/registry/canary.PHASE)."""
        from components.registry.canary import PHASE
        from components.registry.registry import version_tags

        return version_tags(self.name, version).get(PHASE, "traffic")

    def start(self) -> None:
        """Load the arms now, then re-read the aliases every poll_s in a daemon thread (a failed read or load is
        logged and tried again at the next poll: serving goes on with the arms it has)."""
        self.refresh()
        if self.poll_s <= 0 or not (self.challenger_alias or not self.champion_alias.isdigit()):
            return

        def poll() -> None:
            while not self.stopped.wait(self.poll_s):
                try:
                    self.refresh()
                except Exception as e:
                    log.warning(
                        "canary: the aliases could not be re-read (%s: %s); serving goes on", type(e).__name__, e
                    )

        threading.Thread(target=poll, name="rlhf-arms", daemon=True).start()
