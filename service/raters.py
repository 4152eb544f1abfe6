"""Who may judge served answers: raters, each with a bearer token (`rlhf raters add|list|revoke`).

The raters file (registry.feedback.raters_file; default `<state dir>/raters.json`, mode 600) keeps each rater's
name, when they were added and revoked, and the SHA-256 of their token, never the token itself: `rlhf raters add
NAME` prints it once. The served app (`POST /feedback`, service/feedback_api.py) maps `Authorization: Bearer TOKEN`
to the rater through this file, re-read when it changes, so a revoked token stops at the next request.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from components.config import Config
from service.keys import write_private

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class RaterError(ValueError):
    """A raters command that cannot be done, in one sentence."""


@dataclass
class Rater:
    name: str
    token_sha256: str
    added: float
    revoked: float | None = None


def raters_path(cfg: Config) -> Path:
    configured = cfg.registry.feedback.raters_file
    if configured:
        p = Path(configured).expanduser()
        return p if p.is_absolute() else cfg.root_path / p
    return cfg.state_path / "raters.json"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read(path: Path) -> dict[str, Rater]:
    if not path.exists():
        return {}
    try:
        return {name: Rater(**r) for name, r in json.loads(path.read_text())["raters"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise RaterError(f"{path} is not a raters file ({type(e).__name__}: {e}): restore it from a backup") from None


def _write(path: Path, raters: dict[str, Rater]) -> None:
    write_private(path, json.dumps({"raters": {n: asdict(r) for n, r in raters.items()}}, indent=1))


def add(path: Path, name: str) -> str:
    """A new rater, or a new token for a revoked one: -> the token (shown once, stored as its hash)."""
    if not NAME.match(name):
        raise RaterError(
            f"rater name {name!r} must be 1-64 letters, digits, `.`, `_`, `@` or `-`, starting with a letter or digit"
        )
    raters = read(path)
    if name in raters and raters[name].revoked is None:
        raise RaterError(f"{name} is already a rater: `rlhf raters revoke {name}` first to give them a new token")
    token = f"rlhf_{secrets.token_urlsafe(24)}"
    raters[name] = Rater(name, digest(token), time.time())
    _write(path, raters)
    return token


def revoke(path: Path, name: str) -> None:
    raters = read(path)
    if name not in raters:
        raise RaterError(f"no rater {name!r} in {path}: `rlhf raters list` shows them")
    raters[name].revoked = raters[name].revoked or time.time()
    _write(path, raters)


class Directory:
    """token -> rater name, from the raters file, re-read when its modification time or size changes."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[str, str] = {}

    def rater(self, token: str) -> str | None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            raters = read(self.path) if stamp != (0, 0) else {}
            self._by_digest = {r.token_sha256: r.name for r in raters.values() if r.revoked is None}
            self._stamp = stamp
        return self._by_digest.get(digest(token))
