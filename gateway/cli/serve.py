"""``fedgw gateway ...``: run a gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli._common import parse_pairs
from gateway.settings import load_settings

app = typer.Typer(help="Run this domain's gateway.", no_args_is_help=True)


@app.command("serve")
def serve_command(
    domain: Annotated[
        str | None, typer.Option(help="This gateway's domain [env FEDGW_DOMAIN].")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Private state directory [env FEDGW_STATE_DIR; /var/lib/fedgw]."),
    ] = None,
    socket: Annotated[
        Path | None,
        typer.Option(help="Local API unix socket [env FEDGW_SOCKET; /run/fedgw/gateway.sock]."),
    ] = None,
    health_listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT for a plain-HTTP /healthz, for probes [off]."),
    ] = None,
    socket_group: Annotated[
        str | None, typer.Option(help="Group given access to the socket (mode 0660).")
    ] = None,
    identity: Annotated[
        str | None,
        typer.Option(help="builtin (own CA in the state dir) or spire [env FEDGW_IDENTITY]."),
    ] = None,
    spire_socket: Annotated[
        str | None,
        typer.Option(help="SPIRE Workload API socket [env SPIFFE_ENDPOINT_SOCKET]."),
    ] = None,
    svid_ttl: Annotated[
        str | None, typer.Option(help="Built-in CA: life of the gateway's SVID [1h].")
    ] = None,
    ca_ttl: Annotated[
        str | None, typer.Option(help="Built-in CA: life of a CA certificate [1d].")
    ] = None,
    dns_server: Annotated[
        str | None, typer.Option(help="HOST:PORT of the DNS server for SRV lookups [system].")
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the federation API (mutual TLS) [off]."),
    ] = None,
    bundle_listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the bundle endpoint (TLS, for joins) [off]."),
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(help="Host or address peers reach this gateway at [the listen host]."),
    ] = None,
    federated_bundle: Annotated[
        list[str],
        typer.Option(
            "--federated-bundle",
            help="DOMAIN=FILE: trust that domain's SPIFFE bundle (static federation).",
        ),
    ] = [],  # noqa: B006 - typer copies defaults
    dataplane: Annotated[
        str | None,
        typer.Option(help="auto, kernel, userspace (wireguard-go) or off [auto]."),
    ] = None,
    interface_prefix: Annotated[
        str | None, typer.Option(help="Start of the interface names fedgw creates [fgw].")
    ] = None,
    wireguard_port: Annotated[
        int | None, typer.Option(help="UDP port of the first tunnel; one more per peer [51820].")
    ] = None,
    behind_nat: Annotated[
        bool | None,
        typer.Option(
            "--behind-nat/--not-behind-nat",
            help="Peers cannot reach this gateway's UDP ports (keepalives keep paths open).",
        ),
    ] = None,
    mss_clamping: Annotated[
        bool | None,
        typer.Option("--mss-clamping/--no-mss-clamping", help="Clamp TCP MSS on the tunnels."),
    ] = None,
    ipv6_as_needed: Annotated[
        bool | None,
        typer.Option(
            "--ipv6-as-needed/--no-ipv6-as-needed",
            help="New links in the gateway's namespace start without IPv6; fedgw turns it on "
            "where its links carry IPv6. Only where nothing else makes links there.",
        ),
    ] = None,
    connection_lease: Annotated[
        str | None, typer.Option(help="Lease of connections served here [60s].")
    ] = None,
    exclude_prefix: Annotated[
        list[str],
        typer.Option(
            "--exclude-prefix", help="This domain's pod/service CIDR, never given to clients."
        ),
    ] = [],  # noqa: B006
    config: Annotated[
        Path | None, typer.Option(help="TOML file of settings; flags and FEDGW_* win over it.")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error [env FEDGW_LOG_LEVEL].")
    ] = None,
) -> None:
    """Serve the registry and the local API until SIGTERM or SIGINT."""
    settings = load_settings(
        config,
        domain=domain,
        state_dir=state_dir,
        socket=socket,
        socket_group=socket_group,
        health_listen=health_listen,
        log_level=log_level,
        identity=identity,
        svid_ttl=svid_ttl,
        ca_ttl=ca_ttl,
        dns_server=dns_server,
        spire_socket=spire_socket,
        listen=listen,
        bundle_listen=bundle_listen,
        advertise=advertise,
        federated_bundles=parse_pairs(federated_bundle, "--federated-bundle") or None,
        dataplane=dataplane,
        interface_prefix=interface_prefix,
        wireguard_port=wireguard_port,
        behind_nat=behind_nat,
        connection_lease=connection_lease,
        mss_clamping=mss_clamping,
        ipv6_as_needed=ipv6_as_needed,
        exclude_prefixes=exclude_prefix or None,
    )
    # Imported here: the server stack (FastAPI, uvicorn) would slow every other command.
    import uvloop

    from gateway.server import configure_logging, serve

    configure_logging(settings.log_level)
    # uvloop: the gateway's CPU goes to its event loop and HTTP stacks, and uvloop's
    # loop costs a fraction of asyncio's.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings))
