# Two entry points for a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3
STAMP := .make-installed

.PHONY: install demo test test-slow bench

$(STAMP): pyproject.toml
	# the pinned torch takes a local CPU wheel where one is provided, the matching build elsewhere
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m sae_harvest.evaluate demo --out demo-out

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow

bench: $(STAMP)
	$(PYTHON) bench/harvest.py
	$(PYTHON) bench/train.py
	$(PYTHON) bench/evaluate.py
