"""The ``fedgw`` command line. Exit codes: 0 ok, 1 error (one line on stderr), 2 usage."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from fedgw import __version__
from fedgw.errors import FedgwError
from fedgw.models import describe_validation_errors
from gateway.cli import connections, federation, identity, lab, registry, serve, status
from gateway.cli._common import CliState, state
from gateway.settings import DEFAULT_SOCKET

app = typer.Typer(
    name="fedgw",
    help="fedgw: federate network services across clusters and stitch wires between them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)
app.add_typer(serve.app, name="gateway")
app.add_typer(registry.ns_app, name="ns")
app.add_typer(registry.nse_app, name="nse")
app.add_typer(lab.app, name="lab")
app.add_typer(identity.identity_app, name="identity")
app.add_typer(identity.bundle_app, name="bundle")
app.add_typer(federation.token_app, name="token")
app.command("join")(federation.join)
app.command("peers")(federation.peers)
app.command("leave")(federation.leave)
app.command("request")(connections.request)
app.command("connections")(connections.connections)
app.command("close")(connections.close)
app.command("status")(status.status)
app.command("events")(status.events)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"fedgw {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    gateway: Annotated[
        str,
        typer.Option(
            "--gateway",
            "-g",
            envvar="FEDGW_GATEWAY",
            help="Gateway to talk to: unix socket path or http(s) URL.",
        ),
    ] = str(DEFAULT_SOCKET),
    debug: Annotated[
        bool, typer.Option("--debug", envvar="FEDGW_DEBUG", help="Show tracebacks of errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    st = state(ctx)
    st.gateway = gateway
    st.debug = debug


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.exit(1)


def main() -> None:
    """Entry point of the ``fedgw`` console script."""
    cli = CliState(debug=os.environ.get("FEDGW_DEBUG", "") not in ("", "0", "false"))
    try:
        app(prog_name="fedgw", obj=cli)
    except FedgwError as exc:
        if cli.debug:
            raise
        _fail(str(exc))
    except ValidationError as exc:
        if cli.debug:
            raise
        _fail(describe_validation_errors(exc.errors()))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if cli.debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
