"""Shared vocabulary of fedgw: the error tree, names and references, and the records
that cross process boundaries. Every other package may import it; it imports none."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedgw")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
