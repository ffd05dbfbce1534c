"""Routes of the local API, one module per resource."""
