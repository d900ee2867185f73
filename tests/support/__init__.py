"""Helpers shared by the tests: which `proxy` package they import, and polling with deadlines."""
