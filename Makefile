# attnserve: `make run` serves the shipped models, `make test` runs lint and the whole suite.
# Each target creates .venv on first use and installs what it needs with the pinned constraints:
# `make run` the runtime dependencies only (pyproject `dependencies`), `make zoo` the train
# extra, `make bench` the bench extra, `make test` the dev and ray extras. One stamp per set.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# uv does the installs: a runtime install into a fresh venv takes about half of pip's time, a
# third with a warm uv cache (figures in docs/performance.md). pip puts the pinned uv into the
# venv first. --compile-bytecode writes the .pyc files that pip writes at install time.
UV_VERSION := 0.13.9
# uv reads neither pip.conf nor PIP_* variables. It gets the wheel folders that pip is configured
# with (pip's find-links, from its config files or PIP_FIND_LINKS), so both take torch==2.13.0
# from the same place: on the dev and CI machines a local CPU build, not PyPI's CUDA one.
FIND_LINKS ?= $(sort $(shell $(PYTHON) -m pip config list 2>/dev/null \
	| sed -n "s/^[^=]*\.find-links='\(.*\)'$$/\1/p"))

# $(call install,TARGET): pip's `install -c constraints.txt -e TARGET`, done by uv.
define install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python \
		$(addprefix --find-links ,$(FIND_LINKS)) -c constraints.txt -e '$(1)'
endef

RUNTIME := $(VENV)/.installed-runtime
TRAIN   := $(VENV)/.installed-train
BENCH   := $(VENV)/.installed-bench
DEV     := $(VENV)/.installed-dev
RAY     := $(VENV)/.installed-ray

.PHONY: install install-dev test lint browser run zoo bench constraints clean

$(RUNTIME): pyproject.toml constraints.txt
	$(call install,.)
	touch $@

# An extra (train, bench, dev) installs the runtime dependencies too, so it renews that stamp.
$(VENV)/.installed-%: pyproject.toml constraints.txt
	$(call install,.[$*])
	touch $@ $(RUNTIME)

install: $(RUNTIME)

install-dev: $(DEV)

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The viewer's browser tests drive Debian's chromium through chromium-driver (never a browser
# download): installed here when missing and we are root, as on a fresh CI machine; elsewhere
# those tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver; \
	else echo "chromium and chromium-driver are missing (not root): browser tests will skip"; fi

# The ray extra lets the Ray Serve test run (tests/deploy/test_ray.py; it skips without it).
test: lint browser $(RAY)
	$(BIN)/python -m pytest -q

run: $(RUNTIME)
	$(BIN)/attnserve serve

zoo: $(TRAIN)
	$(BIN)/attnserve zoo

bench: $(BENCH)
	$(BIN)/python -m bench.run

# Re-resolve every pin from pyproject.toml (review the diff: torch must stay 2.13.0). The header
# comment and the hand-kept GPU section at the end of constraints.txt are preserved.
constraints:
	$(PYTHON) -m venv /tmp/attnserve-resolve
	/tmp/attnserve-resolve/bin/pip install --quiet --dry-run --report /tmp/attnserve-report.json 'torch==2.13.0' '.[dev,ray]'
	sed -n '1,/^[^#]/{/^#/p}' constraints.txt > /tmp/attnserve-constraints.txt
	/tmp/attnserve-resolve/bin/python -c "import json; r = json.load(open('/tmp/attnserve-report.json')); print('\\n'.join(sorted(i['metadata']['name'] + '==' + i['metadata']['version'].split('+')[0] for i in r['install'] if i['metadata']['name'] != 'attnserve')))" >> /tmp/attnserve-constraints.txt
	sed -n '/^# Linux CUDA/,$$p' constraints.txt >> /tmp/attnserve-constraints.txt
	mv /tmp/attnserve-constraints.txt constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
