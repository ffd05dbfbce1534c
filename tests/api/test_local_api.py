"""The local API served by a real gateway on its unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgw.errors import Conflict, InvalidInput, NotFound
from fedgw.models import EndpointRegistration, NetworkServiceRegistration, validated
from tests.conftest import InProcessGateway, gateway_settings, start_gateway


def ep(name: str, *services: str, **over: Any) -> EndpointRegistration:
    return validated(EndpointRegistration, {"name": name, "services": list(services), **over})


async def test_health_status_and_socket_mode(gateway: InProcessGateway) -> None:
    assert (await gateway.client.health())["status"] == "ok"
    status = await gateway.client.status()
    assert status.domain == "cluster1"
    assert status.endpoints == 0
    assert stat.S_IMODE(os.stat(gateway.settings.socket).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(gateway.settings.state_dir).st_mode) == 0o700


async def test_services_and_endpoints_round_trip(gateway: InProcessGateway) -> None:
    c = gateway.client
    await c.register_service(NetworkServiceRegistration(name="vpn", export=["cluster2"]))
    await c.register_endpoint(
        ep("e1", "vpn", labels={"zone": "a"}, pool="172.16.1.0/24", routes=["10.60.0.0/16"])
    )
    await c.register_endpoint(ep("e2", "vpn", labels={"zone": "b"}, ttl="10m"))
    assert [s.name for s in await c.services()] == ["vpn"]
    assert [e.name for e in await c.endpoints("vpn", {"zone": "a"})] == ["e1"]
    e1 = await c.endpoint("e1")
    assert str(e1.pool) == "172.16.1.0/24"
    assert [str(r) for r in e1.routes] == ["10.60.0.0/16"]
    before = (await c.endpoint("e2")).expires_at
    await asyncio.sleep(0.01)
    assert (await c.refresh_endpoint("e2")).expires_at > before
    with pytest.raises(Conflict, match="still has 2 endpoint"):
        await c.delete_service("vpn")
    await c.delete_endpoint("e1")
    await c.delete_endpoint("e2")
    await c.delete_service("vpn")
    with pytest.raises(NotFound, match="endpoint 'e1' is not registered"):
        await c.endpoint("e1")


async def test_status_codes_and_error_bodies(gateway: InProcessGateway) -> None:
    async with gateway.raw() as http:

        async def call(method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
            r = await http.request(method, path, **kw)
            body = r.json()
            assert set(body) >= {"error", "detail", "retryable"}, body
            return r.status_code, body

        code, body = await call(
            "POST",
            "/v1/endpoints",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert (code, body["error"]) == (400, "malformed_json")
        code, body = await call(
            "POST", "/v1/endpoints", json={"name": "Bad_Name", "services": ["x"]}
        )
        assert code == 422
        assert "'B' at character 1" in body["detail"]
        assert body["errors"][0]["loc"] == "body.name"
        code, body = await call(
            "POST",
            "/v1/endpoints",
            json={"name": "e", "services": ["x"], "workload": {"netns": "no-such"}},
        )
        assert (code, body["error"]) == (400, "workload_not_found")
        code, body = await call("GET", "/v1/endpoints", params={"label": "novalue"})
        assert code == 400
        assert "key=value" in body["detail"]
        code, body = await call("GET", "/v1/endpoints/nope")
        assert (code, body["error"]) == (404, "endpoint_not_found")
        code, body = await call("GET", "/v1/nothing-here")
        assert (code, body["error"]) == (404, "not_found")
        code, body = await call("PUT", "/v1/services")
        assert (code, body["error"]) == (405, "method_not_allowed")
        await http.post("/v1/endpoints", json={"name": "e", "services": ["x"]})
        code, body = await call("DELETE", "/v1/services/x")
        assert (code, body["error"]) == (409, "service_in_use")


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_one_mib_gets_413(gateway: InProcessGateway, chunked: bool) -> None:
    payload = b'{"name": "' + b"a" * (2 << 20) + b'"}'

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    async with gateway.raw() as http:
        r = await http.post(
            "/v1/endpoints",
            content=stream() if chunked else payload,
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 413
    assert r.json()["error"] == "too_large"
    # The gateway is fine afterwards.
    assert (await gateway.client.health())["status"] == "ok"


async def test_body_just_under_the_limit_is_parsed(gateway: InProcessGateway) -> None:
    body = json.dumps({"name": "e", "services": ["x"], "labels": {}, "pad": "a" * 1_000_000})
    async with gateway.raw() as http:
        r = await http.post(
            "/v1/endpoints", content=body, headers={"content-type": "application/json"}
        )
    assert r.status_code == 422
    assert "pad" in r.json()["detail"]


async def test_openapi_is_served(gateway: InProcessGateway) -> None:
    async with gateway.raw() as http:
        doc = (await http.get("/openapi.json")).json()
    assert {"/v1/services", "/v1/endpoints", "/v1/events", "/healthz"} <= set(doc["paths"])
    assert "EndpointRegistration" in doc["components"]["schemas"]


async def test_event_stream_snapshot_changes_and_expiry(gateway: InProcessGateway) -> None:
    c = gateway.client
    await c.register_endpoint(ep("before", "vpn"))
    stream = c.events(snapshot=True)

    async def next_item() -> tuple[str, str | None, str | None]:
        async with asyncio.timeout(5):
            while (item := await anext(stream))["type"] == "heartbeat":
                pass
        items.append(item)
        return item["type"], item.get("kind"), item.get("name")

    items: list[dict[str, Any]] = []
    assert await next_item() == ("added", "service", "vpn")
    assert await next_item() == ("added", "endpoint", "before")
    assert await next_item() == ("synced", None, None)
    endpoint = await c.register_endpoint(ep("short", "vpn", ttl=1))
    assert await next_item() == ("added", "endpoint", "short")
    assert await next_item() == ("deleted", "endpoint", "short")
    assert items[-1]["reason"] == "lease expired"
    late = datetime.fromisoformat(items[-1]["time"]) - endpoint.expires_at
    assert 0 <= late.total_seconds() < 1.0
    await stream.aclose()


async def test_heartbeats_on_idle_stream(gateway: InProcessGateway) -> None:
    async def first() -> dict[str, Any]:
        async for item in gateway.client.events():
            return item
        raise AssertionError("stream ended")

    item = await asyncio.wait_for(first(), 5)
    assert item["type"] == "heartbeat"


async def test_restart_keeps_registrations(short_tmp: Any) -> None:
    settings = gateway_settings(short_tmp)
    gw = await start_gateway(settings)
    await gw.client.register_service(NetworkServiceRegistration(name="vpn", export=["*"]))
    await gw.client.register_endpoint(ep("e1", "vpn", ttl="10m"))
    await gw.client.close()
    await gw.stop()
    assert not settings.socket.exists()

    gw = await start_gateway(settings)
    try:
        assert [e.name for e in await gw.client.endpoints()] == ["e1"]
        assert (await gw.client.services())[0].export == ["*"]
    finally:
        await gw.client.close()
        await gw.stop()


async def test_stopping_ends_open_watchers(short_tmp: Any) -> None:
    gw = await start_gateway(gateway_settings(short_tmp))
    stream = gw.client.events(snapshot=True)
    assert (await anext(stream))["type"] == "synced"
    # Without ending the streams first, the stop would wait for this watcher.
    await asyncio.wait_for(gw.stop(), 3)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 3)
    await gw.client.close()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values | st.text(max_size=70),
        "services": json_values | st.lists(st.text(max_size=10), max_size=3),
        "labels": json_values,
        "pool": json_values | st.sampled_from(["10.0.0.0/8", "10.0.0.1/8", "::/0", "x/1"]),
        "routes": json_values,
        "workload": json_values | st.sampled_from([{"netns": "x"}, {"pid": 1}, {"pid": -1}]),
        "ttl": json_values | st.sampled_from(["10m", "0", "-1s", 1e308]),
        "export": json_values,
    },
)


connection_values = st.fixed_dictionaries(
    {},
    optional={
        "service": json_values | st.sampled_from(["vpn", "vpn@cluster2", "Bad@x", "vpn@"]),
        "workload": json_values | st.sampled_from([{"netns": "nope"}, {"pid": 1}]),
        "labels": json_values,
        "exclude": json_values | st.just(["10.0.0.0/8"]),
        "interface": json_values | st.text(max_size=20),
        "token": json_values | st.text(max_size=60),
        "ttl": json_values | st.sampled_from(["10m", "2d", 0]),
        "uses": json_values,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=field_values | connection_values | json_values,
    path=st.sampled_from(
        ["/v1/endpoints", "/v1/services", "/v1/connections", "/v1/tokens", "/v1/join"]
    ),
)
async def test_no_input_yields_a_500(gateway: InProcessGateway, body: Any, path: str) -> None:
    async with gateway.raw() as http:
        r = await http.post(path, json=body)
    # 503: this gateway runs without data plane nor federation listeners, and says so.
    assert r.status_code in {200, 201, 400, 404, 409, 413, 422, 503}, r.text
    assert set(r.json()) >= {"error", "detail"} or r.status_code < 300


async def test_client_maps_errors(gateway: InProcessGateway) -> None:
    with pytest.raises(InvalidInput, match="no-such"):
        await gateway.client.register_endpoint(ep("e", "x", workload={"netns": "no-such"}))
