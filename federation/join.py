"""The join handshake, both sides.

Joiner: fetch the issuer's bundle from its bundle endpoint and check it against the
token's pins *and* that the endpoint's own certificate is an SVID of the issuer's
gateway under that bundle (a man in the middle fails one or the other); then send the
join request over TLS verified by that bundle.

The join request carries the joiner's bundle, its SVID chain and a proof: a signature by
the SVID's key over the request's fields and a timestamp. The issuer checks that the
bundle verifies the SVID, that the SVID is the joiner's gateway, and the signature —
the client-certificate check of an mTLS call, done at the application layer because
the issuer cannot yet trust the joiner's CA during the TLS handshake.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from datetime import UTC, datetime

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from federation.errors import BadPeerAnswer, PeerUnreachable, PinMismatch
from federation.models import JoinRequest, JoinResponse, parse_answer
from fedgw.errors import InvalidInput, PermissionDenied
from fedgw.http import error_from_response
from spire_integration import (
    BundleSet,
    SpiffeId,
    TrustBundle,
    X509Svid,
    client_context,
    validate_svid,
)
from spire_integration.errors import IdentityError

PROOF_MAX_SKEW = 300.0  # seconds between the joiner's and the issuer's clocks


def proof_message(issuer: str, request: JoinRequest) -> bytes:
    """What the joiner signs: every field that matters, bound to the issuer's domain."""

    def digest(text: str | None) -> str:
        return hashlib.sha256((text or "").encode()).hexdigest()

    return "\n".join(
        [
            "fedgw-join-v1",
            issuer,
            request.domain,
            request.token_id,
            digest(request.secret),
            digest(request.url),
            digest(request.bundle_url),
            digest(request.bundle),
            digest(request.svid),
            f"{request.timestamp:.3f}",
        ]
    ).encode()


def sign(svid: X509Svid, message: bytes) -> str:
    key = svid.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    else:  # pragma: no cover - the SVID types above are all X509-SVIDs allow in practice
        raise InvalidInput(f"cannot sign with a {type(key).__name__}")
    return base64.b64encode(signature).decode()


def _verify_signature(cert: x509.Certificate, signature: bytes, message: bytes) -> None:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, message)
    else:
        raise InvalidSignature(f"unsupported key type {type(key).__name__}")


def build_request(
    issuer: str,
    svid: X509Svid,
    *,
    token_id: str,
    secret: str,
    domain: str,
    url: str | None,
    bundle_url: str | None,
    bundle: TrustBundle,
    now: float,
) -> JoinRequest:
    unsigned = JoinRequest(
        token_id=token_id,
        secret=secret,
        domain=domain,
        url=url,
        bundle_url=bundle_url,
        bundle=bundle.to_json(),
        svid=svid.chain_pem().decode(),
        timestamp=round(now, 3),
        proof="",
    )
    return unsigned.model_copy(update={"proof": sign(svid, proof_message(issuer, unsigned))})


def verify_request(issuer: str, request: JoinRequest, now: float) -> TrustBundle:
    """The joiner's bundle, once the request proves it holds that domain's gateway SVID."""
    if request.domain == issuer:
        raise InvalidInput(f"{issuer} cannot join itself")
    if abs(now - request.timestamp) > PROOF_MAX_SKEW:
        raise PermissionDenied(
            "the join request's timestamp is more than 5 minutes off this gateway's clock; "
            "check that both clocks are right"
        )
    try:
        bundle = TrustBundle.parse(request.domain, request.bundle)
        chain = x509.load_pem_x509_certificates(request.svid.encode())
    except (IdentityError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"the join request's bundle or SVID is not readable: {exc}") from None
    if not chain:
        raise InvalidInput("the join request carries no SVID")
    try:
        spiffe_id = validate_svid(chain, BundleSet([bundle]), datetime.fromtimestamp(now, UTC))
    except IdentityError as exc:
        raise PermissionDenied(f"the joiner's SVID does not check out: {exc}") from None
    if spiffe_id != SpiffeId.for_gateway(request.domain):
        raise PermissionDenied(
            f"the joiner's SVID is {spiffe_id}, not the gateway of {request.domain}"
        )
    try:
        signature = base64.b64decode(request.proof, validate=True)
        _verify_signature(chain[0], signature, proof_message(issuer, request))
    except (InvalidSignature, ValueError):
        raise PermissionDenied("the join request's proof does not verify") from None
    return bundle


async def fetch_pinned_bundle(
    domain: str, url: str, pins: tuple[str, ...], *, http_timeout: float
) -> TrustBundle:
    """The bundle of ``domain`` from its bundle endpoint, trusted because it matches one
    of ``pins`` and because the endpoint proved to hold an SVID of that bundle."""
    insecure = ssl.create_default_context()
    # Nothing to verify against yet: the pins and the SVID check below take its place.
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    try:
        async with (
            httpx.AsyncClient(verify=insecure, timeout=http_timeout) as http,
            http.stream("GET", url.rstrip("/") + "/") as response,
        ):
            ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
            leaf_der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            body = await response.aread()
    except httpx.HTTPError as exc:
        raise PeerUnreachable(f"bundle endpoint of {domain} at {url}: {exc}") from exc
    if response.status_code != 200:
        raise error_from_response(
            response.status_code, body.decode(errors="replace"), source=domain
        )
    try:
        bundle = TrustBundle.parse(domain, body)
    except (IdentityError, RecursionError) as exc:
        raise PinMismatch(f"{url} did not serve a trust bundle of {domain}: {exc}") from None
    if not any(bundle.matches_pin(pin) for pin in pins):
        raise PinMismatch(
            f"the bundle served at {url} does not match the token's pin: someone may be in "
            "the middle, or the token is not for this gateway. Nothing was stored."
        )
    try:
        if leaf_der is None:
            raise PermissionDenied("no certificate")
        leaf = x509.load_der_x509_certificate(leaf_der)
        served_by = validate_svid([leaf], BundleSet([bundle]), datetime.now(UTC))
    except (IdentityError, PermissionDenied, ValueError) as exc:
        raise PinMismatch(
            f"the bundle endpoint at {url} is not {domain}'s gateway ({exc}): someone may be "
            "in the middle. Nothing was stored."
        ) from None
    if served_by != SpiffeId.for_gateway(domain):
        raise PinMismatch(f"the bundle endpoint at {url} is {served_by}, not {domain}'s gateway")
    return bundle


async def send_join(
    issuer: str,
    bundle_url: str,
    issuer_bundle: TrustBundle,
    request: JoinRequest,
    *,
    http_timeout: float,
) -> JoinResponse:
    """POST the join request to the issuer, over TLS verified by its (pinned) bundle."""
    context = client_context(None, issuer_bundle, SpiffeId.for_gateway(issuer))
    try:
        async with httpx.AsyncClient(verify=context, timeout=http_timeout) as http:
            response = await http.post(
                bundle_url.rstrip("/") + "/join", content=request.model_dump_json(),
                headers={"content-type": "application/json"},
            )  # fmt: skip
    except httpx.HTTPError as exc:
        raise PeerUnreachable(f"join endpoint of {issuer} at {bundle_url}: {exc}") from exc
    if response.status_code != 200:
        raise error_from_response(response.status_code, response.text, source=issuer)
    try:
        data = response.json()
    except ValueError:
        raise BadPeerAnswer(f"{issuer} answered the join with something not JSON") from None
    return parse_answer(JoinResponse, data, issuer)
