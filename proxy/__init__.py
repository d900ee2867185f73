"""canary-proxy: a standalone reverse proxy for canary releases."""

__version__ = "0.1.0"
