"""Routing: the pure router (route order, matchers, sticky buckets) over a compiled snapshot."""
