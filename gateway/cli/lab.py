"""``fedgw lab ...``: simulated clusters on this machine (network namespaces)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from gateway.cli._common import JsonOption, print_json, print_table, say

if TYPE_CHECKING:
    from clusters.lab import Lab

app = typer.Typer(
    help="Simulated clusters on this machine: network namespaces, one gateway each.",
    no_args_is_help=True,
)
workload_app = typer.Typer(help="Workload namespaces of a lab cluster.", no_args_is_help=True)
app.add_typer(workload_app, name="workload")

NameOption = Annotated[
    str, typer.Option("--name", envvar="FEDGW_LAB", help="Lab name; labs with other names coexist.")
]


def _lab(name: str, *, verbose: bool = True) -> Lab:
    # Imported here: the lab (with httpx and the data plane) takes a third of a second
    # to import, and only the lab commands need it.
    from clusters.lab import Lab

    if not verbose:
        return Lab(name)
    t0 = time.monotonic()

    def progress(line: str) -> None:
        say(f"[{time.monotonic() - t0:5.2f}s] {line}")

    return Lab(name, progress=progress)


@app.command("up")
def up(
    name: NameOption = "fedgw",
    clusters: Annotated[int, typer.Option(help="How many clusters (cluster1..N).")] = 2,
    nat: Annotated[
        list[str],
        typer.Option("--nat", help="Put this cluster's gateway behind a NAT router (repeatable)."),
    ] = [],  # noqa: B006 - typer copies defaults
) -> None:
    """Build the lab and start one gateway per cluster (harmless when already up)."""
    lab = _lab(name)
    asyncio.run(lab.up(clusters, nat))
    say(f"explore: fedgw lab status --name {name}; tear down: fedgw lab down --name {name}")


@app.command("down")
def down(
    name: NameOption = "fedgw",
    keep_state: Annotated[
        bool, typer.Option(help="Keep each gateway's state dir for the next `up`.")
    ] = False,
) -> None:
    """Stop the lab's processes and remove its namespaces, sockets and files."""
    asyncio.run(_lab(name).down(keep_state))


@app.command("status")
def status(name: NameOption = "fedgw", as_json: bool = JsonOption) -> None:
    """Clusters, namespaces, addresses and gateway health."""
    st = asyncio.run(_lab(name, verbose=False).status())
    if as_json:
        print_json(st)
        return
    say(f"lab {st.name}: underlay {st.underlay_netns}, files in {st.directory}")
    print_table(
        ["CLUSTER", "NETNS", "ADDRESS", "GATEWAY", "PID", "WORKLOADS"],
        [
            (
                c.name,
                c.netns,
                c.node_address + (f" (NAT, public {c.public_address})" if c.nat else ""),
                "healthy" if c.healthy else c.health,
                str(c.gateway_pid or "-"),
                ", ".join(c.workloads) or "-",
            )
            for c in st.clusters
        ],
    )


@app.command("demo")
def demo(name: NameOption = "fedgw") -> None:
    """Run the demo: a lab with two clusters and the story so far (leaves the lab up)."""
    from clusters.demo import run_demo

    run_demo(name, say)


@workload_app.command("add")
def workload_add(
    cluster: Annotated[str, typer.Argument(help="Cluster it belongs to.")],
    workload: Annotated[str, typer.Argument(help="Workload name (a DNS label).")],
    name: NameOption = "fedgw",
) -> None:
    """Create a workload namespace (no connectivity until fedgw wires it)."""
    ns = asyncio.run(_lab(name, verbose=False).add_workload(cluster, workload))
    say(f"workload namespace {ns}")


@app.command("exec")
def exec_(
    cluster: Annotated[str, typer.Argument(help="Cluster whose namespace to run in.")],
    command: Annotated[list[str], typer.Argument(help="The command, after --.")],
    workload: Annotated[
        str | None, typer.Option(help="Run in this workload's namespace instead.")
    ] = None,
    name: NameOption = "fedgw",
) -> None:
    """Run a command in a cluster's gateway node (or workload) namespace, with
    FEDGW_GATEWAY pointing at that cluster's gateway."""
    argv, env = _lab(name, verbose=False).exec_command(cluster, command, workload)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)  # noqa: S606 - running the user's command is the point
