"""SPIFFE identities: the built-in CA and the SPIRE Workload API, SVID validation,
trust bundles and TLS contexts."""
