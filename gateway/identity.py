"""The gateway's identity: the built-in CA or SPIRE, plus the bundles of the domains it
federates with (static config now, joins later)."""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import SettingsError
from gateway.settings import GatewaySettings
from spire_integration import BuiltinIdentitySource, FederatedIdentity, IdentitySource, TrustBundle
from spire_integration.errors import IdentityError

log = logging.getLogger(__name__)


def make_identity(settings: GatewaySettings) -> FederatedIdentity:
    inner: IdentitySource
    if settings.identity == "builtin":
        inner = BuiltinIdentitySource(
            settings.domain,
            settings.state_dir / "identity",
            svid_ttl=settings.svid_ttl,
            ca_ttl=settings.ca_ttl,
        )
    else:
        # Imported here: grpc is heavy, and needed only with SPIRE.
        from spire_integration.spire_source import SpireIdentitySource

        inner = SpireIdentitySource(settings.spire_socket)
    return FederatedIdentity(inner)


async def start_identity(identity: FederatedIdentity, settings: GatewaySettings) -> None:
    await identity.start()
    if identity.trust_domain != settings.domain:
        await identity.stop()
        raise SettingsError(
            f"{identity.description} gives an identity in trust domain "
            f"{identity.trust_domain!r}, but this gateway's domain is {settings.domain!r}"
        )
    for domain, path in settings.federated_bundles.items():
        try:
            document = await asyncio.to_thread(path.read_text)
            identity.set_bundle(TrustBundle.parse(domain, document))
        except OSError as exc:
            raise SettingsError(
                f"federated bundle of {domain}: cannot read {path}: {exc.strerror}"
            ) from exc
        except IdentityError as exc:
            raise SettingsError(f"federated bundle of {domain} in {path}: {exc}") from exc
        log.info("trusting %s through the static bundle %s", domain, path)
