"""API keys: who may call which route, and which tenants' and collections' pages they may see (no Ray).

Keys come from a JSON file (``serve.auth.keys_file``) or an environment variable (``serve.auth.keys_env``, e.g.
filled from a Kubernetes Secret), never from the serve config itself::

    [{"name": "team-a-app", "key": "<secret>", "scopes": ["search", "pages"], "tenants": ["team-a"]},
     {"name": "ops", "sha256": "<hex of the key>", "scopes": ["search", "embed", "rerank", "pages", "admin"]}]

Only the keys' SHA-256 hashes are kept; a key is never logged. A request carries ``Authorization: Bearer <key>``
(what the ``openai`` and ``cohere`` clients send). No valid key is a 401, a key without the route's scope a 403. A
key's ``tenants`` / ``collections`` restrict every search, page and rerank reference to pages whose metadata has one
of them; the restriction is applied inside the search next to the request's own filter, so a request cannot widen
it, and another tenant's page is a 404 like a page that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCOPES", "AuthError", "KeyRing", "Principal"]

SCOPES = ("search", "embed", "rerank", "pages", "admin")


class AuthError(Exception):
    """401 (no valid key) or 403 (a key without the scope); the message never contains the key."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name, scopes, and the tenants / collections it may see (empty = all)."""

    name: str
    scopes: frozenset[str]
    tenants: tuple[str, ...] = ()
    collections: tuple[str, ...] = ()

    def scope(self) -> list[tuple[str, list[str]]]:
        """The restriction on pages: every (field, allowed values) must hold; [] = none."""
        return [(f, list(v)) for f, v in (("tenant", self.tenants), ("collection", self.collections)) if v]


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


@dataclass
class KeyRing:
    """The keys an endpoint accepts, by SHA-256 (empty: keys are off, every caller is anonymous)."""

    by_hash: dict[str, Principal] = field(default_factory=dict)

    @classmethod
    def load(cls, keys_file: str | None, keys_env: str | None) -> KeyRing:
        from ray_vdr.storage import read_bytes

        if keys_file and keys_env:
            raise ValueError("serve.auth: give keys_file or keys_env, not both")
        if keys_file:
            raw, where = read_bytes(keys_file).decode(), f"serve.auth.keys_file ({keys_file})"
        elif keys_env:
            if keys_env not in os.environ:
                raise ValueError(f"serve.auth.keys_env: the environment variable {keys_env} is not set")
            raw, where = os.environ[keys_env], f"serve.auth.keys_env ({keys_env})"
        else:
            return cls()
        try:
            entries = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: expected a non-empty JSON list of keys")
        ring = cls()
        for n, entry in enumerate(entries):
            ring._add(entry, f"{where}[{n}]")
        return ring

    def _add(self, entry: Any, where: str) -> None:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: each key is an object with name, key (or sha256) and scopes")
        unknown = set(entry) - {"name", "key", "sha256", "scopes", "tenants", "collections"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        name = entry.get("name") or where
        if ("key" in entry) == ("sha256" in entry):
            raise ValueError(f"{where} ({name}): give the key or its sha256, one of them")
        if "key" in entry:
            if not isinstance(entry["key"], str) or len(entry["key"]) < 16:
                raise ValueError(f"{where} ({name}): a key must be a string of at least 16 characters")
            digest = hashlib.sha256(entry["key"].encode()).hexdigest()
        else:
            digest = str(entry["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{where} ({name}): sha256 must be 64 hex characters")
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not scopes:
            raise ValueError(f"{where} ({name}): scopes must be a non-empty list of {list(SCOPES)}")
        bad = [s for s in scopes if s not in SCOPES]
        if bad:
            raise ValueError(f"{where} ({name}): unknown scope {bad[0]!r} (scopes: {', '.join(SCOPES)})")
        lists = {}
        for f in ("tenants", "collections"):
            v = entry.get(f, [])
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ValueError(f"{where} ({name}): {f} must be a list of strings")
            lists[f] = tuple(v)
        if digest in self.by_hash:
            raise ValueError(f"{where} ({name}): the same key is listed twice")
        self.by_hash[digest] = Principal(name, frozenset(scopes), lists["tenants"], lists["collections"])

    @property
    def enabled(self) -> bool:
        return bool(self.by_hash)

    def check(self, authorization: str | None, scope: str) -> Principal:
        """The caller of a request with this ``Authorization`` header, allowed ``scope``; AuthError otherwise."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise AuthError(401, "this endpoint needs an API key: send 'Authorization: Bearer <key>'")
        kind, _, key = authorization.strip().partition(" ")
        if kind.lower() != "bearer" or not key.strip() or " " in key.strip():
            raise AuthError(401, "malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        principal = next((p for h, p in self.by_hash.items() if hmac.compare_digest(h, digest)), None)
        if principal is None:
            raise AuthError(401, "invalid API key")
        if scope not in principal.scopes:
            raise AuthError(403, f"the key {principal.name!r} does not have the {scope!r} scope")
        return principal
