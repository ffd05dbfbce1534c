"""Names, domains and the ``name[@domain]`` reference grammar, with errors that say
what is wrong and at which character.

* a *name* (network service, endpoint) is a DNS-1123 label: 1-63 characters of
  ``a-z``, ``0-9`` and ``-``, starting and ending with a letter or digit;
* a *domain* is a DNS name of such labels joined by dots, at most 253 characters,
  lowercase (it is also the SPIFFE trust domain name, which must be lowercase);
* a *reference* is ``name`` or ``name@domain``; ``name@<own domain>`` means ``name``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, PlainSerializer, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from fedgw.errors import InvalidInput

LABEL_MAX = 63
DOMAIN_MAX = 253

_LABEL_CHARS = frozenset(string.ascii_lowercase + string.digits + "-")
_LABEL_KEY_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")


class InvalidName(InvalidInput):
    """A name, domain, reference or label does not follow its grammar."""

    code = "invalid_name"


def _char_problem(what: str, value: str, index: int, allowed: str) -> InvalidName:
    ch = value[index]
    hint = ""
    if ch.isupper() and ch.lower() in _LABEL_CHARS:
        hint = " (uppercase is not allowed: use lowercase)"
    return InvalidName(f"{what} {value!r} has {ch!r} at character {index + 1}: {allowed}{hint}")


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a DNS-1123 label, else raise :class:`InvalidName`."""
    _check_label(value, value, 0, what)
    return value


def _check_label(whole: str, label: str, offset: int, what: str) -> None:
    """Check one DNS-1123 label that sits at ``offset`` inside ``whole``."""
    if not label:
        if whole == label:
            raise InvalidName(f"{what} is empty: expected 1 to {LABEL_MAX} characters")
        raise InvalidName(f"{what} {whole!r} has an empty label at character {offset + 1}")
    if len(label) > LABEL_MAX:
        inside = "" if whole == label else f" (the label at character {offset + 1})"
        raise InvalidName(
            f"{what} {whole!r}{inside} is {len(label)} characters long: "
            f"a DNS label has at most {LABEL_MAX}"
        )
    for i, ch in enumerate(label):
        if ch not in _LABEL_CHARS:
            raise _char_problem(
                what, whole, offset + i, "only lowercase letters, digits and '-' are allowed"
            )
    if label[0] == "-" or label[-1] == "-":
        at = offset if label[0] == "-" else offset + len(label) - 1
        raise InvalidName(
            f"{what} {whole!r} has '-' at character {at + 1}: "
            "a label must start and end with a letter or digit"
        )


def check_domain(value: str, what: str = "domain") -> str:
    """Return ``value`` if it is a lowercase DNS name, else raise :class:`InvalidName`."""
    if not value:
        raise InvalidName(f"{what} is empty: expected a DNS name such as 'cluster1.example'")
    if len(value) > DOMAIN_MAX:
        raise InvalidName(
            f"{what} is {len(value)} characters long: a DNS name has at most {DOMAIN_MAX}"
        )
    if value.endswith("."):
        raise InvalidName(f"{what} {value!r} ends with '.': write it without the final dot")
    offset = 0
    for label in value.split("."):
        _check_label(value, label, offset, what)
        offset += len(label) + 1
    return value


def check_label_key(value: str) -> str:
    """Check an endpoint label key: ``[prefix/]name`` as Kubernetes label keys."""
    what = "label key"
    prefix, slash, name = value.rpartition("/")
    if slash:
        check_domain(prefix, what=f"prefix of label key {value!r}")
    if not name:
        raise InvalidName(f"{what} {value!r} has no name part")
    _check_label_value_chars(value, name, len(value) - len(name), what, allow_empty=False)
    return value


def check_label_value(value: str) -> str:
    """Check an endpoint label value (may be empty)."""
    _check_label_value_chars(value, value, 0, "label value", allow_empty=True)
    return value


def _check_label_value_chars(
    whole: str, part: str, offset: int, what: str, *, allow_empty: bool
) -> None:
    if not part:
        if allow_empty:
            return
        raise InvalidName(f"{what} is empty")
    if len(part) > LABEL_MAX:
        raise InvalidName(f"{what} {whole!r} is longer than {LABEL_MAX} characters")
    for i, ch in enumerate(part):
        if ch not in _LABEL_KEY_CHARS:
            raise InvalidName(
                f"{what} {whole!r} has {ch!r} at character {offset + i + 1}: "
                "only letters, digits, '-', '_' and '.' are allowed"
            )
    if not part[0].isalnum() or not part[-1].isalnum():
        raise InvalidName(f"{what} {whole!r} must start and end with a letter or digit")


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference to a network service: ``name`` in this domain or ``name@domain``."""

    name: str
    domain: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "service name")
        if self.domain is not None:
            check_domain(self.domain)

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``name`` or ``name@domain``; raise :class:`InvalidName` with the position."""
        if not isinstance(text, str):
            raise InvalidName(f"reference must be a string, not {type(text).__name__}")
        name, at, domain = text.partition("@")
        if at and "@" in domain:
            pos = len(name) + 1 + domain.index("@") + 1
            raise InvalidName(f"reference {text!r} has a second '@' at character {pos}")
        try:
            check_name(name, "service name")
        except InvalidName as exc:
            raise InvalidName(f"reference {text!r}: {exc}") from None
        if not at:
            return cls(name)
        try:
            check_domain(domain)
        except InvalidName as exc:
            raise InvalidName(
                f"reference {text!r}: {exc} (the domain starts at character {len(name) + 2})"
            ) from None
        return cls(name, domain)

    def local_to(self, own_domain: str) -> Reference:
        """The same reference as seen from ``own_domain``: ``name@own`` becomes ``name``."""
        if self.domain == own_domain:
            return Reference(self.name)
        return self

    def is_local(self, own_domain: str) -> bool:
        return self.domain is None or self.domain == own_domain

    def __str__(self) -> str:
        return self.name if self.domain is None else f"{self.name}@{self.domain}"


def _pydantic(check: Any, kind: str) -> AfterValidator:
    """Adapt a ``check_*`` function so pydantic reports its message unchanged."""

    def validate(value: str) -> str:
        try:
            result: str = check(value)
        except InvalidName as exc:
            raise PydanticCustomError(kind, "{msg}", {"msg": str(exc)}) from None
        return result

    return AfterValidator(validate)


# Annotated types for pydantic models: they check with the functions above.
Name = Annotated[str, _pydantic(check_name, "invalid_name")]
Domain = Annotated[str, _pydantic(check_domain, "invalid_domain")]
LabelKey = Annotated[str, _pydantic(check_label_key, "invalid_label_key")]
LabelValue = Annotated[str, _pydantic(check_label_value, "invalid_label_value")]


def _parse_reference(value: Any) -> Reference:
    if isinstance(value, Reference):
        return value
    try:
        return Reference.parse(value)
    except InvalidName as exc:
        raise PydanticCustomError("invalid_reference", "{msg}", {"msg": str(exc)}) from None


ReferenceField = Annotated[
    Reference,
    PlainValidator(_parse_reference),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^[a-z0-9-]+(@[a-z0-9.-]+)?$"}),
]
