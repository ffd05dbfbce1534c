"""Gateway settings: one object, from (highest first) command-line flags, ``FEDGW_*``
environment variables, a TOML config file, and defaults. Passed explicitly to whatever
needs it; nothing reads the environment behind the caller's back."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fedgw.durations import Duration, format_duration
from fedgw.models import Network
from fedgw.names import Domain
from gateway.errors import SettingsError
from gateway.registry import RegistrySettings
from wireguard.dataplane import DataplaneSettings
from wireguard.errors import InvalidSpec
from wireguard.routing import check_mark_mask

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL

DEFAULT_SOCKET = Path("/run/fedgw/gateway.sock")

HostPortTuple = tuple[str, int]


def parse_host_port(value: Any) -> HostPortTuple:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a (host, port) pair."""
    if isinstance(value, tuple):
        host, port = value
        text = f"{host}:{port}"
    elif isinstance(value, str):
        text = value.strip()
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. [::1]:8443")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"{value!r}: port {port_text!r} is not a number") from None
    else:
        raise ValueError("expected HOST:PORT")
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port must be between 1 and 65535")
    return host, port


def format_host_port(value: HostPortTuple) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


HostPort = Annotated[
    HostPortTuple,
    BeforeValidator(parse_host_port),
    PlainSerializer(format_host_port, return_type=str),
]
DEFAULT_STATE_DIR = Path("/var/lib/fedgw")


def _int_or_hex(value: object) -> object:
    """Integers as text may be written in hex (``0x1ffff``), as masks usually are."""
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return value  # pydantic says what is wrong with it
    return value


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
    health_listen: HostPort | None = Field(
        None,
        description="HOST:PORT for a plain-HTTP /healthz (probes); off when unset",
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

    # identity and the listeners peers use
    identity: Literal["builtin", "spire"] = Field(
        "builtin",
        description="where the gateway's SVID and trust bundles come from: its own CA in "
        "the state dir, or a SPIRE agent's Workload API",
    )
    spire_socket: str | None = Field(
        None,
        description="SPIRE Workload API socket (path or unix:// URL); "
        "SPIFFE_ENDPOINT_SOCKET when unset",
    )
    svid_ttl: Duration = Field(3600.0, gt=0, description="built-in CA: life of the SVID")
    ca_ttl: Duration = Field(86400.0, gt=0, description="built-in CA: life of a CA certificate")
    listen: HostPort | None = Field(
        None, description="HOST:PORT of the federation API (mutual TLS); off when unset"
    )
    bundle_listen: HostPort | None = Field(
        None,
        description="HOST:PORT of the bundle endpoint (TLS, no client certificate): the "
        "SPIFFE bundle for peers and SPIRE servers, and joins",
    )
    advertise: str | None = Field(
        None,
        description="host or address peers reach this gateway at (its NAT's public address "
        "when behind one); the listen address when unset and not a wildcard",
    )
    bundle_refresh: Duration = Field(
        300.0, gt=0, description="how often peers' bundles are fetched without a refresh hint"
    )
    dns_server: HostPort | None = Field(
        None, description="DNS server (HOST:PORT) for _fedgw._tcp SRV lookups; system's if unset"
    )
    # the data plane
    dataplane: Literal["auto", "kernel", "userspace", "off"] = Field(
        "auto",
        description="WireGuard driver: kernel where it has WireGuard, else wireguard-go "
        "(auto); off: no connections (the gateway then never touches the network)",
    )
    interface_prefix: str = Field(
        "fgw",
        min_length=1,
        max_length=6,
        pattern=r"^[a-z][a-z0-9]*$",
        description="start of every interface name fedgw creates; unique per host",
    )
    wireguard_port: int = Field(
        51820, ge=1, le=65000, description="UDP port of the first tunnel; one more per peer"
    )
    behind_nat: bool = Field(
        False,
        description="peers cannot reach this gateway's UDP ports: advertise no WireGuard "
        "endpoint and keep the paths open with keepalives",
    )
    keepalive: Duration = Field(25.0, ge=1, le=3600, description="WireGuard keepalive behind NAT")
    connection_lease: Duration = Field(
        60.0, ge=1, description="lease of a connection served here; clients refresh at a third"
    )
    handshake_timeout: Duration = Field(
        180.0, ge=5, description="a tunnel whose last handshake is older is considered down"
    )
    mss_clamping: bool = Field(False, description="clamp TCP MSS on the tunnels (nftables)")
    ipv6_as_needed: bool = Field(
        False,
        description="links made in the gateway's namespace start without IPv6; fedgw turns "
        "it on for its tunnels and for wires that carry IPv6. Saves kernel work that grows "
        "with the links there; for a namespace where nothing else makes links",
    )
    mark_mask: Annotated[int, BeforeValidator(_int_or_hex)] = Field(
        DataplaneSettings.model_fields["mark_mask"].default,
        description="packet-mark bits the data plane sets on what arrives from its wires "
        "and tunnels (contiguous, 17 or more); nothing else in its namespace may use them",
    )
    link_group: Annotated[int, BeforeValidator(_int_or_hex)] = Field(
        DataplaneSettings.model_fields["link_group"].default,
        ge=1,
        le=0xFFFFFFFF,
        description="the link group the data plane moves veth pairs into to delete many "
        "at once; nothing else in its namespace may use it",
    )
    exclude_prefixes: list[Network] = Field(
        default_factory=list,
        description="this domain's pod and service CIDRs: never given to its clients",
    )
    federated_bundles: dict[Domain, Path] = Field(
        default_factory=dict,
        description="static federation: trust bundles (SPIFFE format) of other domains",
    )

    @field_validator("mark_mask")
    @classmethod
    def _mark_mask_fits(cls, value: int) -> int:
        try:
            return check_mark_mask(value, DataplaneSettings.model_fields["table_count"].default)
        except InvalidSpec as exc:
            raise ValueError(str(exc)) from None

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

    @model_validator(mode="after")
    def _ttls_fit(self) -> Self:
        # The built-in CA publishes its successor at half life and must still be able to
        # sign a whole SVID after that: its life must be at least three SVID lives.
        if self.identity == "builtin" and self.ca_ttl < 3 * self.svid_ttl:
            raise ValueError(
                f"ca_ttl ({format_duration(self.ca_ttl)}) must be at least 3 x svid_ttl "
                f"({format_duration(self.svid_ttl)})"
            )
        return self

    def public_url(self, address: HostPortTuple | None) -> str | None:
        """The https URL peers use for a listener, or None if it has no usable host."""
        if address is None:
            return None
        host = self.advertise or address[0]
        if host in {"0.0.0.0", "::", ""}:
            return None
        return f"https://{format_host_port((host, address[1]))}"

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
