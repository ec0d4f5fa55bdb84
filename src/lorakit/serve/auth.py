"""API keys: which adapters each key may use, and whether it may load and unload adapters.

    # keys.toml
    [keys."sk-alice"]
    adapters = ["alice", "shared"]     # or "*" for every adapter
    [keys."sk-ops"]
    adapters = "*"
    admin = true                       # may call /v1/load_lora_adapter and /v1/unload_lora_adapter

Every key may use the base model. Without a keys file the server is open: no key is asked for and every
caller is an admin (for a server on 127.0.0.1). A request's key comes as `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the key and the problem."""


@dataclass(frozen=True)
class Key:
    """What one key may do. adapters: the adapter names it may use, or None for every adapter."""

    adapters: frozenset[str] | None
    admin: bool = False

    def allows(self, adapter: str | None) -> bool:
        return adapter is None or self.adapters is None or adapter in self.adapters


OPEN = Key(adapters=None, admin=True)


@dataclass(frozen=True)
class Keys:
    """The keys of a server; `keys` None: an open server."""

    keys: dict[str, Key] | None = None

    @classmethod
    def load(cls, path: str | Path) -> Keys:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeysFileError(f"keys file not found: {path}") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise KeysFileError(f"keys file {path} is not readable TOML ({e})") from None
        table = data.get("keys")
        if not isinstance(table, dict) or not table:
            raise KeysFileError(f"keys file {path} has no [keys.\"KEY\"] tables")
        keys = {}
        for key, entry in table.items():
            if not isinstance(entry, dict):
                raise KeysFileError(f"keys file {path}: keys.{key} must be a table with adapters (and admin)")
            adapters, admin = entry.get("adapters"), entry.get("admin", False)
            if adapters == "*":
                allowed = None
            elif isinstance(adapters, list) and all(isinstance(a, str) and a for a in adapters):
                allowed = frozenset(adapters)
            else:
                raise KeysFileError(f"keys file {path}: keys.{key}.adapters must be \"*\" or a list of adapter "
                                    f"names, got {adapters!r}")
            if not isinstance(admin, bool):
                raise KeysFileError(f"keys file {path}: keys.{key}.admin must be true or false, got {admin!r}")
            unknown = sorted(set(entry) - {"adapters", "admin"})
            if unknown:
                raise KeysFileError(f"keys file {path}: keys.{key} has unknown entry {unknown[0]!r}")
            keys[key] = Key(allowed, admin)
        return cls(keys)

    def find(self, authorization: str | None) -> Key | None:
        """The key an Authorization header carries (an open server: every caller is OPEN); None if missing
        or unknown."""
        if self.keys is None:
            return OPEN
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self.keys.get(authorization.removeprefix("Bearer ").strip())
