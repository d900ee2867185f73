# canary-proxy: `make demo` sets everything up and runs the demo; `make test` runs every check.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup native system-deps redbot demo test lint bench bench-quick bench-fleet rollback-time clean

# Every file of the package: a change to any of them reinstalls it (see $(VENV)/.installed).
SOURCES := $(shell find proxy -name '*.py' -o -name '*.html' -o -name '*.yaml' -o -name 'py.typed')

# The dependencies and dev tools (the package itself comes next, compiled): once per pyproject.toml.
$(VENV)/.deps: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	CANARY_PROXY_PURE=1 $(PYTHON) -m pip install -q '.[dev]'
	touch $@

# The package, installed like a user gets it (a wheel, not editable), rebuilt whenever a source
# changes. setup.py compiles the hot path with mypyc inside the wheel when a C compiler is there
# (about a minute); without one it only warns and the same code runs as pure Python. Nothing is
# written into proxy/. The tests import this installed package (tests/support/package.py).
$(VENV)/.installed: $(VENV)/.deps setup.py $(SOURCES)
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation --force-reinstall .
	rm -rf canary_proxy.egg-info  # left by the build; it would shadow the installed metadata
	$(VENV)/bin/canary-proxy --version
	touch $@

# REDbot (the HTTP linter, tests/test_redbot.py) in a venv of its own: one of its dependencies
# installs a top-level `tests` package, which must not shadow ours.
redbot: $(VENV)/redbot/bin/redbot
$(VENV)/redbot/bin/redbot:
	$(PY) -m venv $(VENV)/redbot
	$(VENV)/redbot/bin/python -m pip install -q 'redbot>=2.7' || echo "warning: redbot not installed; tests/test_redbot.py will skip"

# Python environment: .venv with the dev tools and the package (hot path compiled when possible).
setup: $(VENV)/.installed

# Rebuild and reinstall the package now (after `git pull`, or to pick up a new compiler).
native: $(VENV)/.deps
	rm -f $(VENV)/.installed
	$(MAKE) $(VENV)/.installed

# Debian tools the tests and benchmarks drive: nginx, wrk, hey, promtool, chromium (apt, when missing).
system-deps:
	bash .ci/system-deps.sh

# The main job on a built-in default: demo upstreams, the proxy, traffic, a rollout and a rollback.
demo: setup
	PYTHONSAFEPATH=1 $(PYTHON) -m proxy demo

lint: setup
	$(VENV)/bin/ruff check proxy tests loadtests setup.py
	$(VENV)/bin/mypy --strict proxy
	$(VENV)/bin/hadolint Dockerfile

# The whole test suite (what CI runs).
# With a C compiler the compiled hot path is required (tests/test_native.py checks it), and the
# data-plane tests run a second time on the pure-Python fallback: CANARY_PROXY_PURE=1 makes them
# import the sources in proxy/ instead of the installed, compiled package.
test: system-deps setup redbot lint
	CANARY_PROXY_REQUIRE_NATIVE=$$(command -v gcc >/dev/null && echo 1) $(VENV)/bin/pytest -q -p no:cacheprovider
	CANARY_PROXY_PURE=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/unit tests/test_http_*.py tests/test_hardening_smuggling.py \
		tests/test_hardening_headers.py tests/test_hardening_limits.py tests/test_hardening_upstreams.py tests/test_native.py \
		tests/test_layout_path.py

# Full comparison with nginx: 3 rounds x 10 s per scenario, 1 GiB transfers, 10k idle connections.
bench: setup system-deps
	$(PYTHON) -m loadtests.bench

# CI-sized: 1 round x 3 s, 64 MiB transfers, 1000 idle connections (about 1-2 minutes).
bench-quick: setup system-deps
	$(PYTHON) -m loadtests.bench --quick

# Fleet mode: headline req/s with fleet on vs off (and nginx), rollback time with 3 replicas (~3 min).
bench-fleet: setup system-deps
	$(PYTHON) -m loadtests.fleet

# Seconds from a canary going bad to weight 0, and failed user requests meanwhile (~5 min).
rollback-time: setup
	$(PYTHON) -m loadtests.rollback_time

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache loadtests/.work
	rm -rf build dist *.egg-info
	find proxy -name '*.so' -delete  # left by older in-place builds
