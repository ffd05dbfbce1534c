"""Implementations of the state store interface (:mod:`fedgw.store`): SQLite, the
embedded default, and memory, for tests and benchmarks."""
