"""Federation tokens: the one line that lets a domain join another.

    fedgw1.<payload>.<check>

``payload`` is base64url (no padding) of a compact JSON object: ``i`` token id (public),
``s`` secret (256 random bits), ``d`` issuer domain, ``u`` federation API URLs, ``b``
bundle endpoint URLs, ``p`` SHA-256 pins of the issuer's trust-bundle root keys.
``check`` is the first 8 characters of base64url(SHA-256("fedgw1." + payload)): it tells
a damaged copy ("copy it again") from a forged one (which the issuer and the pins catch).

The issuer stores only SHA-256(secret) — the secret is 256 random bits, so a slow hash
adds nothing — with expiry, uses left, revocation and who used it. A use is claimed with
a conditional store write, so two joins racing on a one-use token cannot both win.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import secrets
import string
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from federation.errors import TokenMalformed, TokenRejected
from fedgw.clock import Clock, to_datetime
from fedgw.durations import format_duration
from fedgw.errors import InvalidInput, NotFound
from fedgw.models import describe_validation_errors
from fedgw.names import Domain
from fedgw.store import ABSENT, Collection, Store, StoreConflict

VERSION = "fedgw1"
DEFAULT_TTL = 600.0
MAX_TTL = 86400.0
MAX_USES = 1000
_ID_CHARS = string.ascii_lowercase + string.digits
_CLAIM_ATTEMPTS = 20


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check(payload: str) -> str:
    return _b64(hashlib.sha256(f"{VERSION}.{payload}".encode()).digest())[:8]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class FederationToken:
    """A parsed token. Its ``repr`` never shows the secret."""

    id: str
    secret: str = field(repr=False)
    domain: str
    urls: tuple[str, ...]
    bundle_urls: tuple[str, ...]
    pins: tuple[str, ...]

    def encode(self) -> str:
        body = {
            "i": self.id,
            "s": self.secret,
            "d": self.domain,
            "u": list(self.urls),
            "b": list(self.bundle_urls),
            "p": list(self.pins),
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{VERSION}.{payload}.{_check(payload)}"

    @classmethod
    def parse(cls, text: str) -> FederationToken:
        """Parse a token line; every way it can be wrong gets its own message."""
        text = text.strip()
        version, _, rest = text.partition(".")
        if version != VERSION:
            if version.startswith("fedgw") and version[5:].isdigit():
                raise TokenMalformed(
                    f"token version {version} is not understood by this fedgw ({VERSION})"
                )
            raise TokenMalformed(f"not a fedgw federation token (it starts with {VERSION}.)")
        payload, _, check = rest.rpartition(".")
        if not payload or not hmac.compare_digest(check.encode(), _check(payload).encode()):
            raise TokenMalformed(
                "the token is damaged (its check does not match): copy it again, whole"
            )
        try:
            body = json.loads(_unb64(payload))
        except (binascii.Error, ValueError) as exc:
            raise TokenMalformed(f"the token's payload is not readable: {exc}") from None
        try:
            fields = _Payload.model_validate(body)
        except ValidationError as exc:
            detail = describe_validation_errors(exc.errors())
            raise TokenMalformed(f"the token is not valid: {detail}") from None
        return cls(fields.i, fields.s, fields.d, tuple(fields.u), tuple(fields.b), tuple(fields.p))


def _https(urls: list[str]) -> list[str]:
    if not all(url.startswith("https://") for url in urls):
        raise ValueError("URLs must be https")
    return urls


class _Payload(BaseModel):
    """The token's fields as they travel (short names keep the line short)."""

    model_config = ConfigDict(extra="ignore")

    i: str = Field(min_length=1, max_length=64)
    s: str = Field(min_length=22, max_length=256)
    d: Domain
    u: Annotated[list[str], AfterValidator(_https)] = Field(min_length=1, max_length=8)
    b: Annotated[list[str], AfterValidator(_https)] = Field(min_length=1, max_length=8)
    p: list[str] = Field(min_length=1, max_length=16)


TokenState = Literal["active", "expired", "used", "revoked"]


class TokenInfo(BaseModel):
    """What may be shown of a token: never its secret, nor the secret's hash."""

    id: str
    description: str
    created_at: datetime
    expires_at: datetime
    uses: int
    uses_left: int
    revoked: bool
    used_by: list[str] = Field(default_factory=list)
    state: TokenState


class TokenRecord(BaseModel):
    """What the issuer stores of a token."""

    id: str
    secret_hash: str
    description: str = ""
    created_at: datetime
    expires_at: datetime
    uses: int
    uses_left: int
    revoked: bool = False
    used_by: list[str] = Field(default_factory=list)

    def state(self, now: float) -> TokenState:
        if self.revoked:
            return "revoked"
        if self.uses_left <= 0:
            return "used"
        if now >= self.expires_at.timestamp():
            return "expired"
        return "active"

    def info(self, now: float) -> TokenInfo:
        return TokenInfo(**self.model_dump(exclude={"secret_hash"}), state=self.state(now))


class TokenIssuer:
    """Creates, lists, revokes and claims the tokens of this domain."""

    KIND = "tokens"

    def __init__(self, store: Store, clock: Clock) -> None:
        self._records = Collection(store, self.KIND, TokenRecord)
        self._store = store
        self._clock = clock

    async def create(
        self,
        *,
        domain: str,
        urls: list[str],
        bundle_urls: list[str],
        pins: list[str],
        ttl: float = DEFAULT_TTL,
        uses: int = 1,
        description: str = "",
    ) -> tuple[FederationToken, TokenInfo]:
        if ttl <= 0:
            raise InvalidInput("a token must expire: give a ttl of at most 1d (e.g. --ttl 10m)")
        if ttl > MAX_TTL:
            raise InvalidInput(
                f"ttl {format_duration(ttl)} is too long: at most {format_duration(MAX_TTL)}"
            )
        if not 1 <= uses <= MAX_USES:
            raise InvalidInput(f"uses must be between 1 and {MAX_USES}, not {uses}")
        if not urls or not bundle_urls or not pins:
            raise InvalidInput(
                "this gateway has no federation URL or trust bundle to put in a token"
            )
        now = self._clock.now()
        secret = _b64(secrets.token_bytes(32))
        for _ in range(5):
            token_id = "".join(secrets.choice(_ID_CHARS) for _ in range(10))
            record = TokenRecord(
                id=token_id,
                secret_hash=hash_secret(secret),
                description=description,
                created_at=to_datetime(now),
                expires_at=to_datetime(now + ttl),
                uses=uses,
                uses_left=uses,
            )
            try:
                await self._records.put(token_id, record, expect=ABSENT)
            except StoreConflict:
                continue  # an id taken already: 36^10 makes this astronomically rare
            token = FederationToken(
                token_id, secret, domain, tuple(urls), tuple(bundle_urls), tuple(pins)
            )
            return token, record.info(now)
        raise RuntimeError("could not find a free token id")

    async def list(self) -> list[TokenInfo]:
        now = self._clock.now()
        records = await self._records.all()
        return sorted((r.info(now) for r in records), key=lambda i: i.created_at)

    async def revoke(self, token_id: str) -> TokenInfo:
        while True:
            stored = await self._store.get(self.KIND, token_id)
            if stored is None:
                raise NotFound(f"no token with id {token_id!r}")
            record = TokenRecord.model_validate_json(stored.value)
            revoked = record.model_copy(update={"revoked": True})
            try:
                await self._records.put(token_id, revoked, expect=stored.revision)
            except StoreConflict:
                continue
            return revoked.info(self._clock.now())

    async def refund(self, token_id: str, joiner: str) -> None:
        """Give back a use that ``joiner`` claimed but could not complete."""
        while True:
            stored = await self._store.get(self.KIND, token_id)
            if stored is None:
                return
            record = TokenRecord.model_validate_json(stored.value)
            if joiner not in record.used_by:
                return
            used_by = list(record.used_by)
            used_by.remove(joiner)
            refunded = record.model_copy(
                update={"uses_left": record.uses_left + 1, "used_by": used_by}
            )
            try:
                await self._records.put(token_id, refunded, expect=stored.revision)
            except StoreConflict:
                continue
            return

    async def claim(self, token_id: str, secret: str, joiner: str) -> TokenInfo:
        """Use the token once for ``joiner``, or raise :class:`TokenRejected`.

        An unknown id and a wrong secret get the same answer, so the answer does not
        tell an attacker which token ids exist.
        """
        for _ in range(_CLAIM_ATTEMPTS):
            stored = await self._store.get(self.KIND, token_id)
            if stored is None:
                raise TokenRejected("the token is not valid for this gateway")
            record = TokenRecord.model_validate_json(stored.value)
            if not hmac.compare_digest(record.secret_hash, hash_secret(secret)):
                raise TokenRejected("the token is not valid for this gateway")
            state = record.state(self._clock.now())
            if state != "active":
                raise TokenRejected(_REFUSALS[state])
            claimed = record.model_copy(
                update={"uses_left": record.uses_left - 1, "used_by": [*record.used_by, joiner]}
            )
            try:
                await self._records.put(token_id, claimed, expect=stored.revision)
            except StoreConflict:
                await asyncio.sleep(0)  # another claim won this round: look again
                continue
            return claimed.info(self._clock.now())
        raise TokenRejected(
            "the token is contended by too many joins at once; try again", retryable=True
        )


_REFUSALS: dict[TokenState, str] = {
    "expired": "the token has expired; ask for a new one (fedgw token create)",
    "used": "the token has been used already; ask for a new one (fedgw token create)",
    "revoked": "the token has been revoked",
    "active": "",
}
