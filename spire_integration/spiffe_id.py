"""SPIFFE IDs (``spiffe://<trust-domain>/<path>``) parsed and checked as the SPIFFE ID
spec requires, with errors that say what is wrong and at which character."""

from __future__ import annotations

import string
from dataclasses import dataclass

from spire_integration.errors import InvalidSpiffeId

SCHEME_PREFIX = "spiffe://"
TRUST_DOMAIN_MAX = 255
SPIFFE_ID_MAX = 2048
GATEWAY_PATH = "/fedgw/gateway"

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def check_trust_domain(name: str) -> str:
    """Return ``name`` if it is a valid trust domain name, else raise :class:`InvalidSpiffeId`."""
    if not name:
        raise InvalidSpiffeId("trust domain is empty")
    if len(name) > TRUST_DOMAIN_MAX:
        raise InvalidSpiffeId(
            f"trust domain is {len(name)} characters long; the SPIFFE ID spec allows "
            f"at most {TRUST_DOMAIN_MAX}"
        )
    for i, ch in enumerate(name):
        if ch not in _TRUST_DOMAIN_CHARS:
            hint = " (trust domains are lowercase)" if ch.isupper() else ""
            raise InvalidSpiffeId(
                f"trust domain {name!r} has {ch!r} at character {i + 1}: only lowercase "
                f"letters, digits, '.', '-' and '_' are allowed{hint}"
            )
    return name


def _check_path(text: str, path: str, offset: int) -> None:
    """Check the path part of ``text``, which starts at ``offset`` (after the trust domain)."""
    if not path:
        return
    if path.endswith("/"):
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} ends with '/': a path has no trailing slash")
    pos = offset + 1  # skip the leading '/'
    for segment in path[1:].split("/"):
        if not segment:
            raise InvalidSpiffeId(
                f"SPIFFE ID {text!r} has an empty path segment at character {pos + 1}"
            )
        if segment in (".", ".."):
            raise InvalidSpiffeId(
                f"SPIFFE ID {text!r} has the path segment {segment!r} at character {pos + 1}: "
                "'.' and '..' are not allowed"
            )
        for i, ch in enumerate(segment):
            if ch not in _PATH_CHARS:
                raise InvalidSpiffeId(
                    f"SPIFFE ID {text!r} has {ch!r} at character {pos + i + 1}: a path "
                    "segment may hold only letters, digits, '.', '-' and '_'"
                )
        pos += len(segment) + 1


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID. ``path`` is empty (the trust domain's own ID) or starts with ``/``."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if self.path and not self.path.startswith("/"):
            raise InvalidSpiffeId(f"SPIFFE ID path {self.path!r} must start with '/'")
        _check_path(str(self), self.path, len(SCHEME_PREFIX) + len(self.trust_domain))

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<path>]``."""
        if not isinstance(text, str):
            raise InvalidSpiffeId(f"SPIFFE ID must be a string, not {type(text).__name__}")
        if not text:
            raise InvalidSpiffeId("SPIFFE ID is empty")
        if len(text.encode()) > SPIFFE_ID_MAX:
            raise InvalidSpiffeId(
                f"SPIFFE ID is {len(text.encode())} bytes long; the spec allows "
                f"at most {SPIFFE_ID_MAX}"
            )
        if not text.startswith(SCHEME_PREFIX):
            scheme, sep, _ = text.partition("://")
            found = f"scheme {scheme!r}" if sep else "no scheme"
            raise InvalidSpiffeId(
                f"SPIFFE ID {text!r} has {found}: it must start with {SCHEME_PREFIX!r}"
            )
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if not domain:
            raise InvalidSpiffeId(f"SPIFFE ID {text!r} has no trust domain")
        for i, ch in enumerate(domain):
            if ch not in _TRUST_DOMAIN_CHARS:
                at = len(SCHEME_PREFIX) + i + 1
                what = {
                    ":": " (a port is not allowed)",
                    "@": " (user info is not allowed)",
                    "?": " (a query is not allowed)",
                    "#": " (a fragment is not allowed)",
                }.get(ch, " (trust domains are lowercase)" if ch.isupper() else "")
                raise InvalidSpiffeId(
                    f"SPIFFE ID {text!r} has {ch!r} at character {at} in its trust domain: "
                    f"only lowercase letters, digits, '.', '-' and '_' are allowed{what}"
                )
        try:
            check_trust_domain(domain)
        except InvalidSpiffeId as exc:
            raise InvalidSpiffeId(f"SPIFFE ID {text!r}: {exc}") from None
        _check_path(text, path, len(SCHEME_PREFIX) + len(domain))
        return cls(domain, path)

    @classmethod
    def for_gateway(cls, domain: str) -> SpiffeId:
        """The SPIFFE ID of the fedgw gateway of ``domain``: ``spiffe://<domain>/fedgw/gateway``."""
        return cls(domain, GATEWAY_PATH)

    @classmethod
    def of_trust_domain(cls, domain: str) -> SpiffeId:
        """The trust domain's own ID ``spiffe://<domain>`` (used in CA certificates)."""
        return cls(domain, "")

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"
