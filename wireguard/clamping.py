"""TCP MSS clamping on a gateway's WireGuard interfaces: one nftables table per gateway,
in the gateway-node namespace, named after its interface prefix."""

from __future__ import annotations

from wireguard.errors import CommandFailed
from wireguard.netns import run


def table_name(prefix: str) -> str:
    return f"fedgw_{prefix}"


def ruleset(prefix: str, tunnel_letter: str) -> str:
    """SYNs (and SYN-ACKs) into and out of the tunnels get an MSS that fits the MTU of the
    route they take, so a workload whose MTU is larger than the tunnel's still gets
    through: the gateway's own ICMP "fragmentation needed" could not reach it (see
    :mod:`wireguard.routing`: the gateway has no address on a wire)."""
    name = table_name(prefix)
    tunnels = f'"{prefix}{tunnel_letter}*"'
    syn = "tcp flags & (syn | rst) == syn"
    # Re-declaring and deleting first makes the whole file one idempotent transaction.
    return (
        f"table inet {name}\n"
        f"delete table inet {name}\n"
        f"table inet {name} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority mangle; policy accept;\n"
        f"    oifname {tunnels} {syn} tcp option maxseg size set rt mtu\n"
        f"    iifname {tunnels} {syn} tcp option maxseg size set rt mtu\n"
        "  }\n"
        "}\n"
    )


def _nft(netns: str | None, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, "nft", *args] if netns else ["nft", *args]


async def has_clamping(netns: str | None, prefix: str) -> bool:
    out = await run(*_nft(netns, "list", "tables", "inet"))
    return f"table inet {table_name(prefix)}" in out.splitlines()


async def apply_clamping(netns: str | None, prefix: str, tunnel_letter: str) -> None:
    await run(*_nft(netns, "-f", "-"), input=ruleset(prefix, tunnel_letter).encode())


async def remove_clamping(netns: str | None, prefix: str) -> bool:
    """False if there was no table."""
    if not await has_clamping(netns, prefix):
        return False
    try:
        await run(*_nft(netns, "delete", "table", "inet", table_name(prefix)))
    except CommandFailed:
        if await has_clamping(netns, prefix):
            raise
        return False
    return True
