# attnserve: `make run` serves the shipped models, `make test` runs lint and the whole suite.
# Both create .venv on first use and install with the pinned constraints.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint run zoo bench constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

run: $(STAMP)
	$(BIN)/attnserve serve

zoo: $(STAMP)
	$(BIN)/attnserve zoo

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Re-resolve every pin from pyproject.toml (review the diff: torch must stay 2.13.0). The header
# comment and the hand-kept GPU section at the end of constraints.txt are preserved.
constraints:
	$(PYTHON) -m venv /tmp/attnserve-resolve
	/tmp/attnserve-resolve/bin/pip install --quiet --dry-run --report /tmp/attnserve-report.json 'torch==2.13.0' '.[dev]'
	sed -n '1,/^[^#]/{/^#/p}' constraints.txt > /tmp/attnserve-constraints.txt
	/tmp/attnserve-resolve/bin/python -c "import json; r = json.load(open('/tmp/attnserve-report.json')); print('\\n'.join(sorted(i['metadata']['name'] + '==' + i['metadata']['version'].split('+')[0] for i in r['install'] if i['metadata']['name'] != 'attnserve')))" >> /tmp/attnserve-constraints.txt
	sed -n '/^# Linux CUDA/,$$p' constraints.txt >> /tmp/attnserve-constraints.txt
	mv /tmp/attnserve-constraints.txt constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
