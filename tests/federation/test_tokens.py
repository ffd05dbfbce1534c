"""Federation tokens: one line, self-checking, secret never shown; claims are atomic."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from federation.errors import TokenMalformed, TokenRejected
from federation.tokens import VERSION, FederationToken, TokenIssuer, hash_secret
from fedgw.clock import ManualClock
from fedgw.errors import InvalidInput, NotFound
from gateway.store.memory import MemoryStore

PIN = "sha256:" + "ab" * 32


def issuer() -> tuple[TokenIssuer, ManualClock, MemoryStore]:
    clock, store = ManualClock(), MemoryStore()
    return TokenIssuer(store, clock), clock, store


async def make(tokens: TokenIssuer, **kw: object) -> FederationToken:
    token, _ = await tokens.create(
        domain="cluster2",
        urls=["https://198.18.0.12:8443"],
        bundle_urls=["https://198.18.0.12:8444"],
        pins=[PIN],
        **kw,  # type: ignore[arg-type]
    )
    return token


async def test_round_trip_and_shape() -> None:
    tokens, _, store = issuer()
    token = await make(tokens)
    line = token.encode()
    assert line.startswith(f"{VERSION}.")
    assert "\n" not in line
    assert " " not in line
    assert FederationToken.parse(line) == token
    assert FederationToken.parse(f"  {line}\n") == token
    assert len(base64.urlsafe_b64decode(token.secret + "==")) >= 16  # >= 128 bits
    assert token.secret not in repr(token)
    # The store holds a hash of the secret, never the secret.
    stored = (await store.scan("tokens"))[0].value
    assert token.secret not in stored
    assert hash_secret(token.secret) in stored


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda t: "hello", "not a fedgw federation token"),
        (lambda t: t.replace(VERSION, "fedgw9", 1), "version fedgw9 is not understood"),
        (lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), "damaged"),
        (lambda t: t[:20] + ("x" if t[20] != "x" else "y") + t[21:], "damaged"),
        (lambda t: t.rpartition(".")[0], "damaged"),
    ],
)
async def test_malformed_tokens(mangle: object, fragment: str) -> None:
    token = await make(issuer()[0])
    with pytest.raises(TokenMalformed, match=fragment):
        FederationToken.parse(mangle(token.encode()))  # type: ignore[operator]


def test_well_checked_but_invalid_payload() -> None:
    from federation.tokens import _b64, _check

    def line(body: object) -> str:
        payload = _b64(json.dumps(body).encode())
        return f"{VERSION}.{payload}.{_check(payload)}"

    with pytest.raises(TokenMalformed, match="u: Field required"):
        FederationToken.parse(line({"i": "x", "s": "y", "d": "c2", "b": ["https://a"], "p": [PIN]}))
    with pytest.raises(TokenMalformed, match="domain 'C2' has 'C' at character 1"):
        FederationToken.parse(
            line(
                {"i": "x", "s": "y", "d": "C2", "u": ["https://a"], "b": ["https://a"], "p": [PIN]}
            )
        )
    with pytest.raises(TokenMalformed, match="URLs must be https"):
        FederationToken.parse(
            line({"i": "x", "s": "y", "d": "c2", "u": ["http://a"], "b": ["https://a"], "p": [PIN]})
        )


async def test_claim_once_then_used() -> None:
    tokens, _, _ = issuer()
    token = await make(tokens)
    info = await tokens.claim(token.id, token.secret, "cluster1")
    assert (info.uses_left, info.used_by, info.state) == (0, ["cluster1"], "used")
    with pytest.raises(TokenRejected, match="used already"):
        await tokens.claim(token.id, token.secret, "cluster3")


async def test_wrong_secret_and_unknown_id_look_the_same() -> None:
    tokens, _, _ = issuer()
    token = await make(tokens)
    with pytest.raises(TokenRejected) as wrong:
        await tokens.claim(token.id, token.secret[:-1] + "x", "cluster1")
    with pytest.raises(TokenRejected) as unknown:
        await tokens.claim("nosuchtoken", token.secret, "cluster1")
    assert str(wrong.value) == str(unknown.value)
    # and a wrong secret did not use the token up
    assert (await tokens.claim(token.id, token.secret, "cluster1")).uses_left == 0


async def test_expiry_on_a_controllable_clock() -> None:
    tokens, clock, _ = issuer()
    token = await make(tokens, ttl=600)
    clock.advance(599)
    assert [t.state for t in await tokens.list()] == ["active"]
    clock.advance(1)
    with pytest.raises(TokenRejected, match="expired"):
        await tokens.claim(token.id, token.secret, "cluster1")
    assert [t.state for t in await tokens.list()] == ["expired"]


async def test_revoked() -> None:
    tokens, _, _ = issuer()
    token = await make(tokens, uses=5)
    info = await tokens.revoke(token.id)
    assert info.state == "revoked"
    with pytest.raises(TokenRejected, match="revoked"):
        await tokens.claim(token.id, token.secret, "cluster1")
    with pytest.raises(NotFound):
        await tokens.revoke("nosuchtoken")


async def test_racing_joins_exactly_one_wins() -> None:
    tokens, _, _ = issuer()
    token = await make(tokens)
    results = await asyncio.gather(
        *(tokens.claim(token.id, token.secret, f"c{i}") for i in range(20)), return_exceptions=True
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(r, TokenRejected) for r in results if r not in wins)


async def test_multi_use_token_counts_down() -> None:
    tokens, _, _ = issuer()
    token = await make(tokens, uses=3)
    results = await asyncio.gather(
        *(tokens.claim(token.id, token.secret, f"c{i}") for i in range(5)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    (info,) = await tokens.list()
    assert info.uses_left == 0
    assert sorted(info.used_by) == sorted(
        r.used_by[-1] for r in results if not isinstance(r, BaseException)
    )


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [({"ttl": 0}, "must expire"), ({"ttl": 86401}, "too long"), ({"uses": 0}, "uses must be")],
)
async def test_create_limits(kw: dict[str, float], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        await make(issuer()[0], **kw)


async def test_list_never_shows_secrets() -> None:
    tokens, _, _ = issuer()
    token = await make(tokens, description="for cluster1")
    (info,) = await tokens.list()
    dumped = info.model_dump_json()
    assert token.secret not in dumped
    assert hash_secret(token.secret) not in dumped
    assert info.description == "for cluster1"
