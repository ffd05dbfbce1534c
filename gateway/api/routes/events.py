"""The event stream: registry changes as newline-delimited JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from fedgw.clock import to_datetime
from gateway.api.deps import GatewayDep
from gateway.errors import EventStreamOverflow

router = APIRouter(prefix="/v1", tags=["events"])

NDJSON = "application/x-ndjson"


@router.get(
    "/events",
    summary="Watch registry changes",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {NDJSON: {}},
            "description": "One JSON object per line: events ({type: added|updated|"
            "deleted, kind, name, object, reason, seq, time}); with snapshot, the "
            "present state as 'added' events (seq 0) and then {type: synced}; "
            "{type: heartbeat} while idle; {type: error, error, detail} if the "
            "watcher fell too far behind (watch again).",
        }
    },
)
async def watch_events(
    gateway: GatewayDep,
    snapshot: Annotated[bool, Query(description="start with the present state")] = False,
) -> StreamingResponse:
    subscription = gateway.bus.subscribe()
    # Subscribed before the snapshot is taken, with no await between: no change can
    # fall between the two.
    initial = gateway.registry.snapshot() if snapshot else []
    heartbeat = gateway.settings.event_heartbeat

    async def lines() -> AsyncIterator[str]:
        with subscription:
            for event in initial:
                yield event.model_dump_json() + "\n"
            if snapshot:
                yield json.dumps({"type": "synced"}) + "\n"
            while True:
                try:
                    async with asyncio.timeout(heartbeat):
                        event = await anext(subscription)
                except TimeoutError:
                    now = to_datetime(gateway.clock.now()).isoformat()
                    yield json.dumps({"type": "heartbeat", "time": now}) + "\n"
                    continue
                except StopAsyncIteration:
                    return
                except EventStreamOverflow as exc:
                    error = {"type": "error", "error": exc.code, "detail": str(exc)}
                    yield json.dumps(error) + "\n"
                    return
                yield event.model_dump_json() + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)
