"""Errors of the gateway package, leaves of the tree rooted at :class:`fedgw.errors.FedgwError`."""

from __future__ import annotations

from fedgw.errors import Conflict, InvalidInput, NotFound, Unavailable


class StateDirInUse(Conflict):
    """Another gateway process already holds this state directory."""

    code = "state_dir_in_use"


class ServiceNotFound(NotFound):
    code = "service_not_found"


class EndpointNotFound(NotFound):
    code = "endpoint_not_found"


class ServiceInUse(Conflict):
    """A network service still has endpoints registered for it."""

    code = "service_in_use"


class WorkloadNotFound(InvalidInput):
    """The netns or process named as an endpoint's workload does not exist."""

    code = "workload_not_found"


class GatewayUnreachable(Unavailable):
    """The CLI or a client cannot reach the gateway's API."""

    code = "gateway_unreachable"


class SettingsError(InvalidInput):
    """Settings (flags, FEDGW_* variables, config file) are missing or wrong."""

    code = "invalid_settings"


class EventStreamOverflow(Unavailable):
    """A watcher fell too far behind; its stream ends and it should watch again
    (with a snapshot) to resynchronise."""

    code = "event_stream_overflow"
