"""service.auth: the keys file's rules, the key lookup shared with gRPC, and the middleware's
route policy on a small Starlette app."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service.auth import AuthMiddleware, KeyRing, Verdict, new_key, presented_key
from service.repository import ConfigError
from service.settings import Settings


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


RING = KeyRing.parse(f"# comment\n\n  {sha('i')}\n{sha('a')}\tadmin\n{sha('j')} infer\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{sha('i')}\n{sha('i').upper()}\n", "line 2: expected the lowercase SHA-256"),
        (f"{sha('i')} root\n", "line 1: unknown scope 'root'"),
        (f"{sha('i')}\n# x\n{sha('i')} admin\n", "line 3: the same digest as line 1"),
        (f"{sha('i')[:-1]}\n", "line 1: expected"),
        (f"{sha('i')} infer extra\n", "line 1: expected"),
        ("# only comments\n\n", "holds no key digest"),
    ],
)
def test_malformed_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KeyRing.parse(text, "keys")


def test_scopes_and_verdicts() -> None:
    assert [RING.scope_of(k) for k in ("i", "a", "j", "x", "")] == [
        "infer",
        "admin",
        "infer",
        None,
        None,
    ]
    assert RING.check("i", "infer") is Verdict.ALLOWED
    assert RING.check("a", "infer") is Verdict.ALLOWED
    assert RING.check("a", "admin") is Verdict.ALLOWED
    assert RING.check("i", "admin") is Verdict.FORBIDDEN
    assert RING.check("x", "infer") is Verdict.UNAUTHENTICATED
    assert RING.check(None, "infer") is Verdict.UNAUTHENTICATED


def test_presented_key_from_headers_or_grpc_metadata() -> None:
    assert presented_key([("Authorization", "Bearer  k1 ")]) == "k1"
    assert presented_key([("authorization", "bearer k1")]) == "k1"
    assert presented_key([("x-api-key", "k2")]) == "k2"
    assert presented_key([("authorization", "Basic azE6")]) is None
    assert presented_key([("authorization", "Bearer ")]) is None
    assert presented_key([]) is None


def test_new_key_line_grants_the_key() -> None:
    key, line = new_key("admin")
    assert KeyRing.parse(line).check(key, "admin") is Verdict.ALLOWED
    key, line = new_key()
    assert KeyRing.parse(line).check(key, "admin") is Verdict.FORBIDDEN
    with pytest.raises(ValueError):
        new_key("root")


async def test_middleware_route_policy(tmp_path) -> None:
    async def ok(request):  # type: ignore[no-untyped-def]
        return PlainTextResponse("ok")

    paths = ["/v1/models", "/v2/repository/index", "/health/ready", "/metrics", "/docs", "/"]
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST", "OPTIONS"]) for p in paths])
    settings = Settings(model_repository=tmp_path, auth_protect_docs=True)
    guarded = AuthMiddleware(app, keys=RING, settings=settings)
    transport = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def status(method: str, path: str, key: str | None = None, **headers: str) -> int:
            if key is not None:
                headers["x-api-key"] = key
            return (await client.request(method, path, headers=headers)).status_code

        assert await status("GET", "/v1/models") == 401
        assert await status("GET", "/v1/models", "i") == 200
        assert await status("POST", "/v2/repository/index") == 401
        assert await status("POST", "/v2/repository/index", "i") == 403
        assert await status("POST", "/v2/repository/index", "a") == 200
        assert await status("GET", "/health/ready") == 200
        assert await status("GET", "/") == 200
        assert await status("GET", "/metrics") == 200  # not protected by default
        assert await status("GET", "/docs") == 401  # protected by the setting
        assert await status("GET", "/docs", "j") == 200
        preflight = {"access-control-request-method": "POST", "origin": "http://x"}
        assert await status("OPTIONS", "/v1/models", **preflight) == 200
        assert await status("OPTIONS", "/v1/models") == 401
        response = await client.post("/v2/repository/index")
        body = response.json()  # the /v2 error shape: a message, no v1 "detail"
        assert isinstance(body["error"], str) and "detail" not in body
