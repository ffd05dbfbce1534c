"""Keys: interop with `wg`, validation, redaction, and key files that stay private."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from wireguard.errors import InsecureKeyFile, InvalidKey
from wireguard.keys import (
    PresharedKey,
    PrivateKey,
    PublicKey,
    load_private_key,
    save_private_key,
)

needs_wg = pytest.mark.skipif(shutil.which("wg") is None, reason="needs wg (wireguard-tools)")


def wg(*args: str, input: str | None = None) -> str:
    return subprocess.run(
        ["wg", *args], input=input, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


@needs_wg
def test_wg_genkey_gives_the_public_key_wg_pubkey_gives() -> None:
    for _ in range(3):
        secret = wg("genkey")
        assert str(PrivateKey.from_base64(secret).public_key()) == wg("pubkey", input=secret)


@needs_wg
def test_our_keys_are_keys_wg_accepts() -> None:
    key = PrivateKey.generate()
    assert wg("pubkey", input=key.secret_base64()) == key.public_key().base64()
    # wg genkey clamps; so do we, so our keys look the same.
    raw = bytes.fromhex(key.secret_hex())
    assert raw[0] & 7 == 0
    assert raw[31] & 0x80 == 0
    assert raw[31] & 0x40


def test_round_trips_and_equality() -> None:
    key = PrivateKey.generate()
    assert PrivateKey.from_base64(key.secret_base64()) == key
    assert PrivateKey.from_hex(key.secret_hex()) == key
    pub = key.public_key()
    assert PublicKey.from_base64(str(pub)) == pub == PublicKey.from_hex(pub.hex())
    assert len(pub.hex()) == 64
    assert len(str(pub)) == 44
    assert {pub, PublicKey(pub.raw)} == {pub}
    assert PrivateKey.generate() != key
    psk = PresharedKey.generate()
    assert PresharedKey.from_base64(psk.secret_base64()) == psk != PresharedKey.generate()


def test_secrets_never_show_in_repr_or_str() -> None:
    key, psk = PrivateKey.generate(), PresharedKey.generate()
    for text in (repr(key), str(key), f"{key}", repr([key]), repr(psk), str(psk)):
        assert key.secret_base64() not in text
        assert key.secret_hex() not in text
        assert psk.secret_base64() not in text
        assert psk.secret_hex() not in text
    assert str(key.public_key()) in repr(key)
    assert "redacted" in repr(key)
    assert "redacted" in repr(psk)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        pickle.dumps(psk)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "44 base64 characters"),
        ("abc", "44 base64 characters"),
        ("A" * 43 + "!", "not valid base64"),
        ("A" * 44, "must decode to 32 bytes"),  # no padding: 33 bytes
        ("=" * 44, "not valid base64"),
    ],
)
def test_malformed_keys_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(InvalidKey, match=why):
        PublicKey.from_base64(text)
    with pytest.raises(InvalidKey, match=why) as exc:
        PrivateKey.from_base64(text)
    if text:
        assert text not in str(exc.value)  # a (mistyped) secret is never echoed


def test_wrong_raw_lengths_and_hex() -> None:
    with pytest.raises(InvalidKey, match="32 raw bytes"):
        PublicKey(b"x" * 31)
    with pytest.raises(InvalidKey, match="not valid hex"):
        PrivateKey.from_hex("zz" * 32)
    with pytest.raises(InvalidKey, match="32 raw bytes"):
        PresharedKey.from_hex("00" * 31)


def test_public_key_is_a_pydantic_field() -> None:
    class Peer(BaseModel):
        public_key: PublicKey

    pub = PrivateKey.generate().public_key()
    peer = Peer.model_validate_json(f'{{"public_key": "{pub}"}}')
    assert peer.public_key == pub
    assert peer.model_dump_json() == f'{{"public_key":"{pub}"}}'
    with pytest.raises(ValidationError, match="44 base64 characters"):
        Peer.model_validate({"public_key": "nope"})


# --- key files -------------------------------------------------------------------------


def test_save_writes_0600_atomically_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "private.key"
    modes_while_writing: list[int] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes) -> int:
        modes_while_writing.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    old = os.umask(0)  # the most permissive umask must not widen the mode
    try:
        save_private_key(key, path)
        save_private_key(key, path)  # replacing an existing file works too
    finally:
        os.umask(old)
    assert modes_while_writing == [0o600, 0o600]  # never wider, not even before the chmod
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.secret_base64() + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.key"]  # no temp left
    assert load_private_key(path) == key


def test_save_with_a_restrictive_umask_still_leaves_owner_access(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        save_private_key(PrivateKey.generate(), tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_load_refuses_files_others_may_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    save_private_key(PrivateKey.generate(), path)
    path.chmod(mode)
    with pytest.raises(InsecureKeyFile, match=f"mode {mode:04o}.*chmod 600"):
        load_private_key(path)


def test_load_accepts_wg_genkey_output_and_read_only_files(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "k"
    path.write_text(f"  {key.secret_base64()}\n")
    path.chmod(0o400)
    assert load_private_key(path) == key


def test_load_reports_garbage_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("my secret is not a key\n")
    path.chmod(0o600)
    with pytest.raises(InvalidKey, match=r"private key file .*44 base64") as exc:
        load_private_key(path)
    assert "my secret" not in str(exc.value)
    with pytest.raises(FileNotFoundError):
        load_private_key(tmp_path / "missing")
