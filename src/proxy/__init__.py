"""canary-proxy: a standalone reverse proxy for canary releases."""

from proxy import native

__version__ = "0.1.0"

# Before anything imports the hot path: use its compiled modules only if they match the sources.
native.guard()
