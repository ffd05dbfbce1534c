"""Settings: flags beat FEDGW_* beat the config file beat defaults; mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import SettingsError
from gateway.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("FEDGW_"):
            monkeypatch.delenv(key)


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        'domain = "from-file"\nlog_level = "debug"\nstate_dir = "/srv/fedgw"\n'
        '[registry]\ndefault_ttl = "2m"\n'
    )
    s = load_settings(config)
    assert (s.domain, s.log_level, s.registry.default_ttl) == ("from-file", "debug", 120)
    monkeypatch.setenv("FEDGW_DOMAIN", "from-env")
    monkeypatch.setenv("FEDGW_REGISTRY__DEFAULT_TTL", "30s")
    s = load_settings(config)
    assert (s.domain, s.registry.default_ttl, s.state_dir) == ("from-env", 30, Path("/srv/fedgw"))
    s = load_settings(config, domain="from-flag", state_dir=None)
    assert s.domain == "from-flag"
    assert s.state_dir == Path("/srv/fedgw")


def test_unrelated_fedgw_variables_do_not_break_the_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDGW_GATEWAY", "/run/other.sock")  # the CLI's, not the gateway's
    assert load_settings(domain="c1").domain == "c1"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('domain = "c1"\ncolour = "blue"\n', "unknown setting 'colour' in"),
        ('domain = "Cluster_1"\n', "domain: domain 'Cluster_1' has 'C' at character 1"),
        ("domain = \n", "is not valid TOML"),
        ('log_level = "loud"\n', "domain is required"),
        ('domain = "c1"\n[registry]\ndefault_ttl = "soon"\n', "registry.default_ttl"),
    ],
)
def test_errors_name_the_setting(tmp_path: Path, content: str, fragment: str) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(content)
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(")):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(tmp_path / "nope.toml", domain="c1")


def test_socket_path_too_long() -> None:
    with pytest.raises(SettingsError, match="longer than 107 bytes"):
        load_settings(domain="c1", socket="/tmp/" + "x" * 120)


def test_the_mark_mask_takes_hex_and_must_hold_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(domain="c1").mark_mask == 0x1FFFF
    monkeypatch.setenv("FEDGW_MARK_MASK", "0x3ffff000")
    assert load_settings(domain="c1").mark_mask == 0x3FFFF000
    for bad, fragment in (("0xf0f0", "contiguous"), ("0xffff", "100000 tables"), ("lots", "int")):
        monkeypatch.setenv("FEDGW_MARK_MASK", bad)
        with pytest.raises(SettingsError, match=f"mark_mask.*{fragment}"):
            load_settings(domain="c1")


def test_the_link_group_takes_hex_and_is_not_the_default_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(domain="c1").link_group == 0xFED6
    monkeypatch.setenv("FEDGW_LINK_GROUP", "0x1234")
    assert load_settings(domain="c1").link_group == 0x1234
    for bad, fragment in (("0", "greater than or equal to 1"), ("0x100000000", "less than")):
        monkeypatch.setenv("FEDGW_LINK_GROUP", bad)
        with pytest.raises(SettingsError, match=f"link_group.*{fragment}"):
            load_settings(domain="c1")
