"""WireGuard keys: X25519 private/public keys and preshared keys as value types, and
private key files that are never readable by anyone but their owner."""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from wireguard.errors import InsecureKeyFile, InvalidKey

KEY_LEN = 32
_B64_LEN = 44  # base64 of 32 bytes, with one '=' of padding, as `wg` prints it


def _decode(text: str, what: str, *, secret: bool) -> bytes:
    """Strict base64 of exactly 32 bytes; a secret is never quoted back in the error."""
    if not isinstance(text, str):
        raise InvalidKey(f"{what} must be a base64 string, not {type(text).__name__}")
    shown = "" if secret else f" {text[:60]!r}"
    text = text.strip()
    if len(text) != _B64_LEN:
        raise InvalidKey(
            f"{what}{shown} must be {_B64_LEN} base64 characters ({KEY_LEN} bytes), "
            f"got {len(text)} characters"
        )
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidKey(f"{what}{shown} is not valid base64") from None
    if len(raw) != KEY_LEN:  # 44 characters without padding are 33 bytes
        raise InvalidKey(f"{what}{shown} must decode to {KEY_LEN} bytes, got {len(raw)}")
    return raw


def _check_raw(raw: bytes, what: str) -> bytes:
    if not isinstance(raw, bytes) or len(raw) != KEY_LEN:
        raise InvalidKey(f"{what} must be {KEY_LEN} raw bytes")
    return raw


def _from_hex(text: str, what: str, *, secret: bool) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        shown = "" if secret else f" {text[:70]!r}"
        raise InvalidKey(f"{what}{shown} is not valid hex") from None
    return _check_raw(raw, what)


class PublicKey:
    """A peer's (or our) X25519 public key; ``str()`` is the base64 form ``wg`` prints.

    Usable as a pydantic field type (validated from and serialised to base64)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = _check_raw(raw, "public key")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(_decode(text, "public key", secret=False))

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        return cls(_from_hex(text, "public key", secret=False))

    @property
    def raw(self) -> bytes:
        return self._raw

    def base64(self) -> str:
        return base64.b64encode(self._raw).decode("ascii")

    def hex(self) -> str:
        """The form the userspace UAPI speaks."""
        return self._raw.hex()

    def __str__(self) -> str:
        return self.base64()

    def __repr__(self) -> str:
        return f"PublicKey({self.base64()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((PublicKey, self._raw))

    def __lt__(self, other: PublicKey) -> bool:
        return self._raw < other._raw

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def parse(value: object) -> PublicKey:
            if isinstance(value, PublicKey):
                return value
            if isinstance(value, str):
                try:
                    return cls.from_base64(value)
                except InvalidKey as exc:
                    raise ValueError(str(exc)) from None
            raise ValueError("a public key must be a base64 string")

        return core_schema.no_info_plain_validator_function(
            parse,
            json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )


class PrivateKey:
    """An X25519 private key. Its secret is never part of ``str()``/``repr()``; ask for
    it explicitly with :meth:`secret_base64`/:meth:`secret_hex`."""

    __slots__ = ("_public", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = _check_raw(raw, "private key")
        x = X25519PrivateKey.from_private_bytes(self._raw)
        self._public = PublicKey(x.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> PrivateKey:
        raw = bytearray(X25519PrivateKey.generate().private_bytes_raw())
        # Clamp as `wg genkey` does, so our keys look like its keys; X25519 clamps anyway,
        # so the public key is the same either way.
        raw[0] &= 248
        raw[31] = (raw[31] & 127) | 64
        return cls(bytes(raw))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(_decode(text, "private key", secret=True))

    @classmethod
    def from_hex(cls, text: str) -> PrivateKey:
        return cls(_from_hex(text, "private key", secret=True))

    def public_key(self) -> PublicKey:
        return self._public

    def secret_base64(self) -> str:
        return base64.b64encode(self._raw).decode("ascii")

    def secret_hex(self) -> str:
        return self._raw.hex()

    def __str__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        return f"PrivateKey(public={self._public.base64()!r}, secret=<redacted>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and hmac.compare_digest(other._raw, self._raw)

    def __hash__(self) -> int:
        return hash((PrivateKey, self._public))

    def __reduce__(self) -> Any:
        # Pickling would copy the secret into who knows what; say so instead.
        raise TypeError("private keys are not picklable; save them with save_private_key")


class PresharedKey:
    """A symmetric key mixed into the handshake (post-quantum hedge); secret like a
    private key, so never shown by ``str()``/``repr()``."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = _check_raw(raw, "preshared key")

    @classmethod
    def generate(cls) -> PresharedKey:
        return cls(secrets.token_bytes(KEY_LEN))

    @classmethod
    def from_base64(cls, text: str) -> PresharedKey:
        return cls(_decode(text, "preshared key", secret=True))

    @classmethod
    def from_hex(cls, text: str) -> PresharedKey:
        return cls(_from_hex(text, "preshared key", secret=True))

    def secret_base64(self) -> str:
        return base64.b64encode(self._raw).decode("ascii")

    def secret_hex(self) -> str:
        return self._raw.hex()

    def __str__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        return "PresharedKey(<redacted>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PresharedKey) and hmac.compare_digest(other._raw, self._raw)

    def __hash__(self) -> int:
        return hash(PresharedKey)

    def __reduce__(self) -> Any:
        raise TypeError("preshared keys are not picklable")


# --- key files ----------------------------------------------------------------------------


def save_private_key(key: PrivateKey, path: Path) -> None:
    """Write ``key`` to ``path`` (base64 and a newline, as ``wg genkey``), atomically.

    The data goes to a temporary file created with mode 0600 in the same directory (so
    no other user can open it at any moment, whatever the umask), is fsynced, and then
    renamed over ``path``. Blocking: from async code, call it on a thread.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # a umask can only take bits away; make it exactly 0600
            os.write(fd, (key.secret_base64() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash too
    finally:
        os.close(dir_fd)


def load_private_key(path: Path) -> PrivateKey:
    """Read a private key written by :func:`save_private_key` or ``wg genkey``.

    Refuses a file that group or others may access (mode & 0o077): a key that others
    could read must be considered leaked. Symlinks are followed (Kubernetes secrets are
    mounted through them); the mode checked is the one of the file actually read.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InsecureKeyFile(f"private key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise InsecureKeyFile(
                f"private key file {path} has mode {mode:04o}: group/others may access it; "
                f"make it 0600 (chmod 600 {path}) or generate a new key if it leaked"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidKey(f"private key file {path} is not base64 text") from None
    try:
        return PrivateKey.from_base64(text)
    except InvalidKey as exc:
        raise InvalidKey(f"private key file {path}: {exc}") from None
