"""``fedgw token ...``, ``fedgw join``, ``fedgw peers``, ``fedgw leave``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from federation.models import TokenCreate
from fedgw.durations import parse_duration
from gateway.cli._common import JsonOption, print_json, print_table, relative, say, with_client

token_app = typer.Typer(
    help="Federation tokens that let other domains join this one.", no_args_is_help=True
)


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    ttl: Annotated[str, typer.Option(help="How long it can be used (at most 1d).")] = "10m",
    uses: Annotated[int, typer.Option(help="How many joins it allows.")] = 1,
    description: Annotated[str, typer.Option(help="A note shown in `fedgw token list`.")] = "",
    as_json: bool = JsonOption,
) -> None:
    """Print a one-line token; give it to the other domain's `fedgw join`.

    The line holds a secret: it is shown only here, and this gateway keeps only a hash.
    """
    request = TokenCreate(ttl=parse_duration(ttl, "--ttl"), uses=uses, description=description)
    created = with_client(ctx, lambda c: c.create_token(request))
    if as_json:
        print_json(created)
    else:
        sys.stdout.write(created.token + "\n")


@token_app.command("list")
def token_list(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Tokens of this domain and their state (never their secrets)."""
    tokens = with_client(ctx, lambda c: c.tokens())
    if as_json:
        print_json(tokens)
        return
    print_table(
        ["ID", "STATE", "USES LEFT", "EXPIRES", "USED BY", "DESCRIPTION"],
        [
            (
                t.id,
                t.state,
                f"{t.uses_left}/{t.uses}",
                relative(t.expires_at),
                ", ".join(t.used_by) or "-",
                t.description or "-",
            )
            for t in tokens
        ],
    )


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context, token_id: Annotated[str, typer.Argument(help="The token's id.")]
) -> None:
    """Revoke a token: later joins with it are refused."""
    with_client(ctx, lambda c: c.revoke_token(token_id))
    say(f"token {token_id} revoked")


def join(
    ctx: typer.Context,
    token: Annotated[str, typer.Argument(help="The line `fedgw token create` printed.")],
    as_json: bool = JsonOption,
) -> None:
    """Join the domain that issued TOKEN: both become peers."""
    peer = with_client(ctx, lambda c: c.join(token))
    if as_json:
        print_json(peer)
    else:
        fingerprint = peer.bundle_fingerprint[:23]
        say(f"joined {peer.domain}: federation API {peer.url}, bundle {fingerprint}")


def peers(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Domains this gateway federates with."""
    table = with_client(ctx, lambda c: c.peers())
    if as_json:
        print_json(table)
        return
    print_table(
        ["DOMAIN", "STATE", "URL", "BUNDLE", "BUNDLE REFRESHED", "LAST CONTACT"],
        [
            (
                p.domain,
                p.state + (f" ({p.last_error})" if p.last_error else ""),
                p.url or "-",
                f"{p.bundle_fingerprint[:23]} #{p.bundle_sequence}",
                relative(p.last_bundle_refresh) if p.last_bundle_refresh else "-",
                relative(p.last_contact) if p.last_contact else "-",
            )
            for p in table
        ],
    )


def leave(
    ctx: typer.Context, domain: Annotated[str, typer.Argument(help="The peer domain.")]
) -> None:
    """Stop federating with DOMAIN: both sides forget each other."""
    result = with_client(ctx, lambda c: c.leave(domain))
    if result.told:
        say(f"left {domain}; it forgot this domain too")
    else:
        say(f"left {domain}, but could not tell it ({result.detail}); it refuses us anyway")
