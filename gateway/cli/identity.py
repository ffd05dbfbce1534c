"""``fedgw identity show`` and ``fedgw bundle show``."""

from __future__ import annotations

import json
import sys

import typer

from gateway.cli._common import (
    JsonOption,
    print_fields,
    print_json,
    print_table,
    relative,
    with_client,
)

identity_app = typer.Typer(help="This gateway's SPIFFE identity.", no_args_is_help=True)
bundle_app = typer.Typer(help="This domain's SPIFFE trust bundle.", no_args_is_help=True)


@identity_app.command("show")
def identity_show(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """SPIFFE ID, where it comes from, when it expires, and the bundles trusted."""
    info = with_client(ctx, lambda c: c.identity())
    if as_json:
        print_json(info)
        return
    expires = info.svid_expires_at
    print_fields(
        [
            ("SPIFFE ID", info.spiffe_id or "-"),
            ("source", f"{info.source}: {info.description}"),
            ("SVID expires", f"{expires.isoformat()} ({relative(expires)})" if expires else "-"),
        ]
        + ([("error", info.error)] if info.error else [])
    )
    print_table(
        ["TRUST DOMAIN", "SEQUENCE", "AUTHORITIES", "FINGERPRINT"],
        [
            (b.trust_domain, str(b.sequence), str(b.authorities), b.fingerprint)
            for b in info.bundles
        ],
    )


@bundle_app.command("show")
def bundle_show(ctx: typer.Context) -> None:
    """Print the SPIFFE bundle (JSON) that this domain's bundle endpoint serves."""
    bundle = with_client(ctx, lambda c: c.bundle())
    sys.stdout.write(json.dumps(bundle, indent=2) + "\n")
