"""``python -m gateway`` is ``fedgw``."""

from gateway.cli import main

main()
