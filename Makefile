# canary-proxy: `make demo` sets everything up and runs the demo; `make test` runs every check.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup native system-deps redbot demo test lint bench bench-quick bench-fleet rollback-time clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

# Python environment: .venv with the package (editable) and the dev tools, hot path compiled.
setup: $(VENV)/.installed native

# REDbot (the HTTP linter, tests/test_redbot.py) in a venv of its own: one of its dependencies
# installs a top-level `tests` package, which must not shadow ours.
redbot: $(VENV)/redbot/bin/redbot
$(VENV)/redbot/bin/redbot:
	$(PY) -m venv $(VENV)/redbot
	$(VENV)/redbot/bin/python -m pip install -q 'redbot>=2.7' || echo "warning: redbot not installed; tests/test_redbot.py will skip"

# Compile the hot path with mypyc when its sources changed since the last build (about 20 s).
# Without a C compiler this only warns: the same code then runs as pure Python, slower.
native: $(VENV)/.installed
	$(PYTHON) -m proxy.build_native --optional --if-stale

# Debian tools the tests and benchmarks drive: nginx, wrk, hey, promtool, chromium (apt, when missing).
system-deps:
	bash .ci/system-deps.sh

# The main job on a built-in default: demo upstreams, the proxy, traffic, a rollout and a rollback.
demo: setup
	$(PYTHON) -m proxy demo

lint: setup
	$(VENV)/bin/ruff check src tests loadtests
	$(VENV)/bin/mypy --strict src/proxy
	$(VENV)/bin/hadolint Dockerfile

# The whole test suite (what CI runs).
# With a C compiler the compiled hot path is required (tests/test_native.py checks it), and the
# data-plane tests run a second time on the pure-Python fallback.
test: system-deps setup redbot lint
	CANARY_PROXY_REQUIRE_NATIVE=$$(command -v gcc >/dev/null && echo 1) $(VENV)/bin/pytest -q -p no:cacheprovider
	CANARY_PROXY_PURE=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_http_*.py tests/test_hardening_smuggling.py \
		tests/test_hardening_headers.py tests/test_hardening_limits.py tests/test_hardening_upstreams.py tests/test_native.py

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
	find src/proxy -name '*.so' -delete; rm -f src/proxy/.native-stamp
