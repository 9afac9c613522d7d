"""API keys: optional authentication with an inference scope and a management scope.

`ATTNSERVE_API_KEYS_FILE` names a file of SHA-256 digests, one a line with an optional scope
(`infer`, the default, or `admin`), so a leaked file leaks no key. A client presents its key as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; the key's digest is compared with every
entry in constant time. `AuthMiddleware` guards HTTP; `KeyRing.check` is the same decision for
any other protocol (gRPC passes its metadata). No key ever reaches a log.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.handlers import respond
from service.repository import ConfigError
from service.settings import Settings

__all__ = [
    "ADMIN",
    "ADMIN_PATH_PREFIXES",
    "INFER",
    "AuthMiddleware",
    "KeyRing",
    "Verdict",
    "load_keys",
    "new_key",
    "presented_key",
    "register",
]

INFER = "infer"
ADMIN = "admin"
_RANK = {INFER: 0, ADMIN: 1}  # an admin key may do everything an infer key may

ADMIN_PATH_PREFIXES: tuple[str, ...] = ("/v2/repository/",)
"""Paths that change what the server serves; they need an admin key."""
_OPEN_PREFIXES = ("/health/", "/v2/health/", "/static/")  # probes, the viewer's assets
_OPEN_PATHS = frozenset({"/"})  # the viewer's page (its API calls carry the key)
_METRICS_PATHS = frozenset({"/metrics"})
_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

_LINE = re.compile(r"^(?P<digest>[0-9a-f]{64})(?:\s+(?P<scope>\S+))?$")


class Verdict(enum.Enum):
    """The answer to a key for a scope: HTTP 200 / 401 / 403, gRPC OK / UNAUTHENTICATED /
    PERMISSION_DENIED."""

    ALLOWED = "allowed"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"


def digest(key: str) -> str:
    """The lowercase SHA-256 hex digest of `key` (UTF-8), as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(scope: str = INFER) -> tuple[str, str]:
    """A fresh random key and the keys-file line that grants it `scope`."""
    if scope not in _RANK:
        raise ValueError(f"scope must be {INFER!r} or {ADMIN!r}, not {scope!r}")
    key = secrets.token_urlsafe(32)
    return key, f"{digest(key)} {scope}"


@dataclass(frozen=True)
class KeyRing:
    """The digests of the accepted keys with the scope of each."""

    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def parse(cls, text: str, source: str = "the keys file") -> KeyRing:
        """Entries from the file's text; ConfigError naming the first bad line."""
        entries: list[tuple[bytes, str]] = []
        seen: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                raise ConfigError(
                    f"{source} line {number}: expected the lowercase SHA-256 hex digest of a key "
                    f"(64 characters 0-9a-f), optionally followed by a scope ({INFER} or {ADMIN})"
                )
            scope = match["scope"] or INFER
            if scope not in _RANK:
                raise ConfigError(
                    f"{source} line {number}: unknown scope {scope!r}; use {INFER} or {ADMIN}"
                )
            if match["digest"] in seen:
                raise ConfigError(
                    f"{source} line {number}: the same digest as line {seen[match['digest']]}"
                )
            seen[match["digest"]] = number
            entries.append((bytes.fromhex(match["digest"]), scope))
        if not entries:
            raise ConfigError(f"{source} holds no key digest")
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """The keys file at `path`; ConfigError if it cannot be read or has a bad line."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the API keys file {path}: {exc}") from None
        return cls.parse(text, f"API keys file {path}")

    def scope_of(self, key: str) -> str | None:
        """The scope `key` grants, or None. Every entry is compared, in constant time each, so
        the time taken tells nothing about which entry (if any) matched."""
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for stored, scope in self.entries:
            if hmac.compare_digest(presented, stored):
                found = scope
        return found

    def check(self, key: str | None, needed: str) -> Verdict:
        """Whether `key` (None: none was presented) may use a route that needs `needed`."""
        scope = self.scope_of(key) if key else None
        if scope is None:
            return Verdict.UNAUTHENTICATED
        return Verdict.ALLOWED if _RANK[scope] >= _RANK[needed] else Verdict.FORBIDDEN


def presented_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key in `Authorization: Bearer <key>` or `X-API-Key: <key>`; names in any case, so
    that ASGI headers and gRPC metadata both fit."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == "authorization":
            kind, _, credential = value.strip().partition(" ")
            if kind.lower() == "bearer" and credential.strip():
                return credential.strip()
        elif lowered == "x-api-key" and value.strip():
            return value.strip()
    return None


def load_keys(settings: Settings) -> KeyRing | None:
    """The key ring of `settings`, or None when authentication is off."""
    if settings.api_keys_file is None:
        return None
    return KeyRing.load(settings.api_keys_file)


class AuthMiddleware:
    """Answers 401 (no or unknown key) or 403 (an infer key on a management route) before the
    application sees the request; health probes and CORS preflights pass without a key."""

    def __init__(self, app: ASGIApp, keys: KeyRing, settings: Settings) -> None:
        self.app = app
        self.keys = keys
        self.protected: set[str] = set()
        if settings.auth_protect_metrics:
            self.protected |= _METRICS_PATHS
        if settings.auth_protect_docs:
            self.protected |= _DOCS_PATHS

    def needed_scope(self, scope: Scope) -> str | None:
        """The scope a request needs (None: open)."""
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if path.startswith(ADMIN_PATH_PREFIXES):
            return ADMIN
        if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            return None
        if path in _METRICS_PATHS or path in _DOCS_PATHS:
            return INFER if path in self.protected else None
        if scope.get("method") == "OPTIONS" and _header(scope, b"access-control-request-method"):
            return None  # browsers send preflights without credentials
        return INFER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = self.needed_scope(scope)
        if needed is None:
            await self.app(scope, receive, send)
            return
        headers = (
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
        )
        verdict = self.keys.check(presented_key(headers), needed)
        if verdict is Verdict.ALLOWED:
            await self.app(scope, receive, send)
            return
        if verdict is Verdict.UNAUTHENTICATED:
            response = respond(
                Request(scope),
                401,
                "unauthorized",
                "this server needs an API key: send Authorization: Bearer <key> or X-API-Key",
                {"WWW-Authenticate": "Bearer"},
            )
        else:
            response = respond(
                Request(scope),
                403,
                "forbidden",
                f"this route needs a key with the {needed} scope",
                {"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def register(commands: Any) -> None:
    """Add `keys new [--scope admin]` to the CLI's subparsers."""
    keys = commands.add_parser("keys", help="make API keys for ATTNSERVE_API_KEYS_FILE")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new",
        help="print a fresh random key and the line that grants it in the keys file",
        description="Print a fresh random key (give it to the client; it is stored nowhere) "
        "and the line to append to the file named by ATTNSERVE_API_KEYS_FILE.",
    )
    new.add_argument("--scope", choices=[INFER, ADMIN], default=INFER, help="default: infer")
    new.set_defaults(func=_keys_new)


def _keys_new(args: argparse.Namespace) -> int:
    key, line = new_key(args.scope)
    print(f"key:  {key}")
    print(f"line: {line}")
    return 0
