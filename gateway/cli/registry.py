"""``fedgw ns ...`` and ``fedgw nse ...``: network services and endpoints."""

from __future__ import annotations

from typing import Annotated

import typer

from fedgw.durations import format_duration, parse_duration
from fedgw.errors import InvalidInput
from fedgw.models import (
    Endpoint,
    EndpointRegistration,
    NetworkService,
    NetworkServiceRegistration,
    validated,
)
from gateway.cli._common import (
    JsonOption,
    parse_labels,
    print_json,
    print_table,
    relative,
    say,
    with_client,
)

ns_app = typer.Typer(help="Network services of this domain.", no_args_is_help=True)
nse_app = typer.Typer(help="Network service endpoints (NSEs) of this domain.", no_args_is_help=True)


def _exports(service: NetworkService) -> str:
    return ", ".join(service.export) if service.export else "(not exported)"


@ns_app.command("register")
def ns_register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Service name (a DNS label).")],
    export: Annotated[
        list[str],
        typer.Option("--export", help="Peer domain that may use it; '*' for all (repeatable)."),
    ] = [],  # noqa: B006 - typer copies defaults
    as_json: bool = JsonOption,
) -> None:
    """Register a network service, or update its export list."""
    reg = validated(NetworkServiceRegistration, {"name": name, "export": export})
    service = with_client(ctx, lambda c: c.register_service(reg))
    if as_json:
        print_json(service)
    else:
        say(f"network service {service.name} registered; export: {_exports(service)}")


DomainOption = typer.Option(
    "--domain", help="List what this peer domain exports to us, asked over mTLS."
)


@ns_app.command("list")
def ns_list(
    ctx: typer.Context,
    domain: Annotated[str | None, DomainOption] = None,
    as_json: bool = JsonOption,
) -> None:
    """List network services (of this domain, or exported to it by a peer)."""
    if domain is not None:
        remote = with_client(ctx, lambda c: c.peer_services(domain))
        if as_json:
            print_json(remote)
        else:
            print_table(
                ["NAME", "PAYLOAD", "DOMAIN"], [(s.name, s.payload, s.domain) for s in remote]
            )
        return
    services = with_client(ctx, lambda c: c.services())
    if as_json:
        print_json(services)
        return
    print_table(
        ["NAME", "PAYLOAD", "EXPORT", "UPDATED"],
        [(s.name, s.payload, _exports(s), relative(s.updated_at)) for s in services],
    )


@ns_app.command("delete")
def ns_delete(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Service name.")]
) -> None:
    """Delete a network service that has no endpoints."""
    with_client(ctx, lambda c: c.delete_service(name))
    say(f"network service {name} deleted")


def _workload(ep: Endpoint) -> str:
    return str(ep.workload) if ep.workload else "-"


@nse_app.command("register")
def nse_register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Endpoint name (a DNS label).")],
    service: Annotated[
        list[str], typer.Option("--service", "-s", help="Service it provides (repeatable).")
    ],
    label: Annotated[
        list[str], typer.Option("--label", "-l", help="Label key=value (repeatable).")
    ] = [],  # noqa: B006
    pool: Annotated[
        str | None, typer.Option(help="CIDR it hands client addresses out from.")
    ] = None,
    route: Annotated[
        list[str], typer.Option("--route", help="Prefix it offers to clients (repeatable).")
    ] = [],  # noqa: B006
    netns: Annotated[
        str | None, typer.Option(help="Its network namespace; keeps the lease alive.")
    ] = None,
    pid: Annotated[
        int | None, typer.Option(help="A process in its netns; keeps the lease alive.")
    ] = None,
    ttl: Annotated[
        str | None, typer.Option(help="Lease, e.g. 60s or 10m [gateway default].")
    ] = None,
    as_json: bool = JsonOption,
) -> None:
    """Register an endpoint, or update it.

    With --netns or --pid the gateway keeps the lease alive for as long as that
    namespace or process exists; without, refresh it before the ttl runs out
    (`fedgw nse refresh`).
    """
    data: dict[str, object] = {
        "name": name,
        "services": service,
        "labels": parse_labels(label),
        "routes": route,
    }
    if pool is not None:
        data["pool"] = pool
    if netns is not None and pid is not None:
        raise InvalidInput("give --netns or --pid, not both")
    if netns is not None:
        data["workload"] = {"netns": netns}
    elif pid is not None:
        data["workload"] = {"pid": pid}
    if ttl is not None:
        data["ttl"] = parse_duration(ttl, "--ttl")
    reg = validated(EndpointRegistration, data)
    endpoint = with_client(ctx, lambda c: c.register_endpoint(reg))
    if as_json:
        print_json(endpoint)
    else:
        say(
            f"endpoint {endpoint.name} registered for {', '.join(endpoint.services)}; "
            f"lease {format_duration(endpoint.ttl)}, expires {relative(endpoint.expires_at)}"
        )


@nse_app.command("refresh")
def nse_refresh(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    ttl: Annotated[str | None, typer.Option(help="New lease length [its own].")] = None,
) -> None:
    """Extend an endpoint's lease."""
    seconds = None if ttl is None else parse_duration(ttl, "--ttl")
    endpoint = with_client(ctx, lambda c: c.refresh_endpoint(name, seconds))
    say(f"endpoint {endpoint.name} lease expires {relative(endpoint.expires_at)}")


@nse_app.command("list")
def nse_list(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Option(help="Only endpoints of this service.")] = None,
    label: Annotated[
        list[str], typer.Option("--label", "-l", help="Only with label key=value (repeatable).")
    ] = [],  # noqa: B006
    domain: Annotated[str | None, DomainOption] = None,
    as_json: bool = JsonOption,
) -> None:
    """List endpoints (of this domain, or of what a peer exports to it)."""
    if domain is not None:
        remote = with_client(ctx, lambda c: c.peer_endpoints(domain, service))
        if as_json:
            print_json(remote)
        else:
            print_table(
                ["NAME", "SERVICES", "LABELS", "ROUTES", "DOMAIN"],
                [
                    (
                        e.name,
                        ",".join(e.services),
                        ",".join(f"{k}={v}" for k, v in e.labels.items()) or "-",
                        ",".join(str(r) for r in e.routes) or "-",
                        e.domain,
                    )
                    for e in remote
                ],
            )
        return
    selector = parse_labels(label)
    endpoints = with_client(ctx, lambda c: c.endpoints(service, selector))
    if as_json:
        print_json(endpoints)
        return
    print_table(
        ["NAME", "SERVICES", "LABELS", "POOL", "ROUTES", "WORKLOAD", "EXPIRES"],
        [
            (
                ep.name,
                ",".join(ep.services),
                ",".join(f"{k}={v}" for k, v in ep.labels.items()) or "-",
                str(ep.pool) if ep.pool else "-",
                ",".join(str(r) for r in ep.routes) or "-",
                _workload(ep),
                relative(ep.expires_at),
            )
            for ep in endpoints
        ],
    )


@nse_app.command("delete")
def nse_delete(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Endpoint name.")]
) -> None:
    """Delete an endpoint."""
    with_client(ctx, lambda c: c.delete_endpoint(name))
    say(f"endpoint {name} deleted")
