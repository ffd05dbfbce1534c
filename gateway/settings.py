"""Gateway settings: one object, from (highest first) command-line flags, ``FEDGW_*``
environment variables, a TOML config file, and defaults. Passed explicitly to whatever
needs it; nothing reads the environment behind the caller's back."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fedgw.names import Domain
from gateway.errors import SettingsError
from gateway.registry import RegistrySettings

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL

DEFAULT_SOCKET = Path("/run/fedgw/gateway.sock")
DEFAULT_STATE_DIR = Path("/var/lib/fedgw")


class GatewaySettings(BaseSettings):
    """Everything a gateway process is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="FEDGW_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    domain: Domain = Field(description="this gateway's domain, also its SPIFFE trust domain")
    state_dir: Path = Field(
        DEFAULT_STATE_DIR, description="private directory (0700) for the store and keys"
    )
    socket: Path = Field(
        DEFAULT_SOCKET, description="unix socket (mode 0660) of the local API for workloads"
    )
    socket_group: str | None = Field(
        None, description="group that owns the local API socket (its members may use it)"
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body the APIs accept (413 above)"
    )
    event_queue_size: int = Field(
        10_000, ge=16, description="events a watcher may fall behind before it is cut off"
    )
    event_heartbeat: float = Field(
        15.0, gt=0, description="seconds between heartbeat lines on an idle event stream"
    )
    netns_dir: Path = Field(Path("/run/netns"), description="where named network namespaces live")
    proc_dir: Path = Field(Path("/proc"), description="where the process table is mounted")
    store_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL",
        description="SQLite synchronous mode: NORMAL survives a crash of the gateway, "
        "FULL also a power cut",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    @field_validator("socket")
    @classmethod
    def _socket_fits(cls, value: Path) -> Path:
        if len(str(value.absolute()).encode()) > UNIX_PATH_MAX:
            raise ValueError(
                f"socket path {value} is longer than {UNIX_PATH_MAX} bytes, "
                "the limit of a unix socket address; choose a shorter path"
            )
        return value.absolute()

    @field_validator("state_dir", "netns_dir", "proc_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.absolute()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags > FEDGW_* > config file > defaults
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Settings from flags (``overrides``; ``None`` means "not given"), the environment
    and ``config_file``; every problem becomes one :class:`SettingsError` that names
    the setting and where it came from."""
    given = {k: v for k, v in overrides.items() if v is not None}
    settings_cls: type[GatewaySettings] = GatewaySettings
    if config_file is not None:
        _check_config_file(config_file)

        class _FromFile(GatewaySettings):
            model_config = SettingsConfigDict(toml_file=config_file)

        settings_cls = _FromFile
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        raise SettingsError(describe_settings_errors(exc, config_file)) from None


def _check_config_file(path: Path) -> None:
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def describe_settings_errors(exc: ValidationError, config_file: Path | None) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        if err["type"] == "missing":
            parts.append(
                f"{name} is required (flag --{name.replace('_', '-')}, or FEDGW_{name.upper()})"
            )
        elif err["type"] == "extra_forbidden":
            where = f" in {config_file}" if config_file else ""
            parts.append(f"unknown setting {name!r}{where}")
        else:
            parts.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
