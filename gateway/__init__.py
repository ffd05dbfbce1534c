"""The fedgw gateway: settings, the registry and its store, the local API and the CLI."""
