"""The gateway's HTTP APIs (FastAPI): the local API for workloads of this domain."""
