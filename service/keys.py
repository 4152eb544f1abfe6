"""The project's signing keys (components/registry/provenance.py signs and verifies with them).

A keyring is a JSON file, mode 600: {"active": KID, "keys": [{"kid", "secret" (hex), "created", "retired"}]}.
Where it lives: the file named by RLHF_SIGNING_KEYS (the server profile: `rlhf services up` writes one beside its
credentials file and names it in the endpoints file, so the orchestrator, the workers and the serving processes of
one deployment share it), else `<state dir>/secrets/signing-keys.json`, made on first use (the local profile).

`rlhf secret rotate` adds a key and makes it the one that signs; older keys still verify until `rlhf secret retire
KID`. A worker never makes a keyring: without the deployment's, it cannot verify a stage request and takes the
remote allow-list alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from components.config import Config

KEYS_ENV = "RLHF_SIGNING_KEYS"


class KeyringError(RuntimeError):
    """A keyring that cannot be read or changed, in one sentence."""


@dataclass
class Key:
    kid: str
    secret: str  # hex
    created: float
    retired: float | None = None


@dataclass
class Keyring:
    path: Path
    active: str
    keys: list[Key]

    def signer(self) -> tuple[str, bytes]:
        """(key id, secret) of the key that signs."""
        key = next(k for k in self.keys if k.kid == self.active)
        return key.kid, bytes.fromhex(key.secret)

    def verifying(self) -> dict[str, bytes]:
        """The keys a signature may verify against: every key not retired."""
        return {k.kid: bytes.fromhex(k.secret) for k in self.keys if k.retired is None}

    def rotate(self) -> Key:
        with _locked(self.path):
            self.keys = read(self.path).keys  # as it is now: a rotation elsewhere is kept
            key = new_key()
            self.keys.append(key)
            self.active = key.kid
            self.save()
        return key

    def retire(self, kid: str) -> None:
        with _locked(self.path):
            fresh = read(self.path)
            self.keys, self.active = fresh.keys, fresh.active
            self._retire(kid)

    def _retire(self, kid: str) -> None:
        key = next((k for k in self.keys if k.kid == kid), None)
        if key is None:
            raise KeyringError(f"no key {kid!r} in {self.path}: `rlhf secret list` shows the key ids")
        if kid == self.active:
            raise KeyringError(f"{kid} is the key that signs: `rlhf secret rotate` first, then retire it")
        key.retired = key.retired or time.time()
        self.save()

    def save(self) -> None:
        write_private(self.path, json.dumps({"active": self.active, "keys": [asdict(k) for k in self.keys]}, indent=1))


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def new_key() -> Key:
    return Key(
        f"k{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(3)}", secrets.token_hex(32), time.time()
    )


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by its owner alone (a fresh temporary file of a random name,
    created exclusively: never a file or link someone placed there)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL, mode 600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keyring_path(cfg: Config | None = None) -> Path:
    if name := os.environ.get(KEYS_ENV):
        return Path(name).expanduser().resolve()
    if cfg is None:
        raise KeyringError(f"no keyring: set {KEYS_ENV} to the deployment's signing-keys file")
    return cfg.state_path / "secrets" / "signing-keys.json"


def read(path: Path) -> Keyring:
    try:
        doc = json.loads(path.read_text())
        ring = Keyring(path, doc["active"], [Key(**k) for k in doc["keys"]])
        ring.signer()
        return ring
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        raise KeyringError(
            f"{path} is not a signing keyring ({type(e).__name__}: {e}): restore it from a backup"
        ) from None


def load(cfg: Config | None = None, create: bool = True, path: Path | None = None) -> Keyring | None:
    """The keyring (at `path`, else keyring_path(cfg)), made on first use when `create` (the local profile); None
    when there is none and not `create`."""
    path = path or keyring_path(cfg)
    try:
        return read(path)
    except FileNotFoundError:
        if not create:
            return None
    key = new_key()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    write_private(tmp, json.dumps({"active": key.kid, "keys": [asdict(key)]}, indent=1))
    try:
        os.link(tmp, path)  # atomic and exclusive: two first uses at once end with one keyring
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read(path)
