"""Errors of the lab, leaves of :class:`fedgw.errors.FedgwError`."""

from __future__ import annotations

from fedgw.errors import Conflict, FedgwError, InvalidInput, NotFound, PermissionDenied, Unavailable


class LabError(FedgwError):
    code = "lab_error"


class LabInvalid(LabError, InvalidInput):
    """A lab, cluster or workload name or count the lab cannot build."""

    code = "lab_invalid"


class LabNotFound(LabError, NotFound):
    """No lab (or cluster, or workload) of that name is up."""

    code = "lab_not_found"


class LabConflict(LabError, Conflict):
    """A lab of that name exists with another shape."""

    code = "lab_conflict"


class LabNeedsRoot(LabError, PermissionDenied):
    code = "lab_needs_root"


class LabGatewayFailed(LabError, Unavailable):
    """A cluster's gateway did not become healthy."""

    code = "lab_gateway_failed"
