"""Routing: the compiled snapshot (matchers, bucket tables, bound counters) and the pure router."""
