"""pytest fixtures for tests that need simulated clusters (root only).

``lab`` is a lab that is up for one test and always taken down after it; shape it with
``@pytest.mark.lab(clusters=3, nat=["cluster3"], gateway_args=["--connection-lease", "3s"])``.
``lab_factory`` makes as many labs as a test needs. Enable with
``pytest_plugins = ["clusters.pytest_plugin"]`` or ``-p clusters.pytest_plugin``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import pytest_asyncio

from clusters.lab import Lab

LabFactory = Callable[..., Awaitable[Lab]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lab(clusters=2, nat=(), gateway_args=()): the `lab` fixture's simulated clusters",
    )


def unique_lab_name() -> str:
    return f"t{secrets.token_hex(3)}"


@pytest_asyncio.fixture
async def lab_factory() -> AsyncIterator[LabFactory]:
    labs: list[Lab] = []

    async def make(
        clusters: int = 2, nat: Sequence[str] = (), gateway_args: Sequence[str] = ()
    ) -> Lab:
        lab = Lab(unique_lab_name(), gateway_args=gateway_args)
        labs.append(lab)  # before up: a half-built lab is taken down too
        await lab.up(clusters, nat)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            await lab.down()


@pytest_asyncio.fixture
async def lab(request: pytest.FixtureRequest, lab_factory: LabFactory) -> Lab:
    marker = request.node.get_closest_marker("lab")
    shape = marker.kwargs if marker else {}
    return await lab_factory(
        shape.get("clusters", 2), shape.get("nat", ()), shape.get("gateway_args", ())
    )
