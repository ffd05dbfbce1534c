"""The WireGuard data plane: keys, drivers (kernel, userspace, in-memory), wires into
workload namespaces, and address management."""
