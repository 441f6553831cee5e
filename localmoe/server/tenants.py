"""API keys as tenants: each key with its role, its limits and its priority, from `--api-keys-file` (YAML) and from
`--api-key` / `--admin-api-key` (or their environment variables).

A key is known by its name everywhere it shows (metrics labels, /v1/stats/usage, logs), never by its secret; the
server keeps only the secret's SHA-256, so looking a key up takes the same time whichever key is sent.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# the names the keys given on the command line (or by environment) go by
FLAG_KEY_NAMES = {"user": "api-key", "admin": "admin-api-key"}


class KeyEntry(BaseModel):
    """One key of the file: its secret inline (`key`) or in an environment variable (`key_env`, for secrets a
    deployment mounts), its role and what it may use; a limit left out is no limit."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, description="the tenant's name; default: key-<SHA-256 prefix>")
    key: str | None = Field(None, min_length=1)
    key_env: str | None = Field(None, min_length=1)
    role: Literal["user", "admin"] = "user"
    priority: int | None = Field(None, description="a request's default priority and its most urgent (lower is "
                                 "more urgent, as vLLM's)")
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0, description="prompt + completion tokens used in a minute")
    max_concurrent_requests: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def one_secret(self) -> "KeyEntry":
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give the secret as `key` or as `key_env` (an environment variable's name), one of them")
        return self


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Limits:
    """What one key may use; None is no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True)
class APIKey:
    name: str
    role: str  # user | admin
    digest: bytes = field(repr=False)  # SHA-256 of the secret
    limits: Limits = Limits()
    priority: int | None = None

    def priority_for(self, asked: int | None) -> int:
        """The priority a request runs at: the key's where the request asks none, and never more urgent (lower)
        than the key's."""
        if self.priority is None:
            return asked or 0
        return self.priority if asked is None else max(asked, self.priority)


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class KeysFileError(ValueError):
    """An API keys file that cannot be used, with a message naming the file and the entry."""


def read_keys_file(path: str | Path, environ: dict[str, str] | None = None) -> list[APIKey]:
    environ = os.environ if environ is None else environ
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise KeysFileError(f"api_keys_file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise KeysFileError(f"api_keys_file {path}: not YAML: {e}") from None
    try:
        entries = KeysFile.model_validate(raw).keys
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise KeysFileError(f"api_keys_file {path}: {where}: {first['msg'].removeprefix('Value error, ')} "
                            "(expected keys: a list of {name, key or key_env, role, priority, requests_per_minute, "
                            "tokens_per_minute, max_concurrent_requests})") from None
    keys = []
    for index, entry in enumerate(entries):
        secret = entry.key if entry.key_env is None else environ.get(entry.key_env)
        if not secret:
            raise KeysFileError(f"api_keys_file {path}: keys.{index}.key_env: the environment variable "
                                f"{entry.key_env} is not set")
        hashed = digest(secret.encode())
        limits = Limits(entry.requests_per_minute, entry.tokens_per_minute, entry.max_concurrent_requests)
        keys.append(APIKey(entry.name or f"key-{hashed.hex()[:8]}", entry.role, hashed, limits, entry.priority))
    return keys


def key_ring(api_key: str | None, admin_key: str | None, file_keys: list[APIKey] | tuple[APIKey, ...] = ()
             ) -> dict[bytes, APIKey]:
    """Every key the server takes, by its secret's digest: the flags' (no limits) and the file's. A secret or a
    name given twice is refused: its role, limits and usage would be ambiguous."""
    keys = [APIKey(FLAG_KEY_NAMES[role], role, digest(secret.encode()))
            for role, secret in (("user", api_key), ("admin", admin_key)) if secret]
    keys += file_keys
    ring: dict[bytes, APIKey] = {}
    for key in keys:
        if key.digest in ring:
            raise KeysFileError(f"the keys {ring[key.digest].name!r} and {key.name!r} have the same secret")
        ring[key.digest] = key
    names = [key.name for key in keys]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise KeysFileError(f"the key name {twice[0]!r} is given to more than one key")
    return ring
