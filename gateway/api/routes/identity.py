"""This gateway's identity and trust bundle, on the local API."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from gateway.api.deps import GatewayDep
from gateway.api.schemas import BundleInfo, IdentityInfo

router = APIRouter(prefix="/v1", tags=["identity"])
bundle_router = APIRouter(tags=["bundle endpoint"])

SPIFFE_BUNDLE = "application/json"


@router.get("/identity", summary="SPIFFE ID, source, expiry and the bundles trusted")
async def identity(gateway: GatewayDep) -> IdentityInfo:
    status = gateway.identity.status()
    return IdentityInfo(
        spiffe_id=status.spiffe_id,
        source=status.kind,
        description=status.description,
        svid_expires_at=status.svid_not_after,
        error=status.error,
        bundles=[
            BundleInfo(
                trust_domain=b.trust_domain,
                sequence=b.sequence,
                authorities=b.authorities,
                fingerprint=b.fingerprint,
            )
            for b in status.bundles
        ],
    )


@bundle_router.get(
    "/",
    summary="This domain's trust bundle (SPIFFE bundle format)",
    response_class=Response,
    responses={200: {"content": {SPIFFE_BUNDLE: {}}}},
)
@router.get(
    "/bundle",
    summary="This domain's trust bundle (SPIFFE bundle format)",
    response_class=Response,
    responses={200: {"content": {SPIFFE_BUNDLE: {}}}},
)
async def bundle(gateway: GatewayDep) -> Response:
    return Response(gateway.identity.own_bundle().to_json(), media_type=SPIFFE_BUNDLE)
