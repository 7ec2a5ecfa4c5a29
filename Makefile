# `make demo` and `make test` each do all set-up on a fresh clone (a .venv with pinned versions), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo test-slow clean chromium

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP) chromium
	$(PY) -m pytest -q

# Debian's chromium for the report's browser test (tests/test_report.py); without root the test is skipped.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: chromium is missing and we are not root: the HTML report's browser test will be skipped"; fi; }

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/mmalign demo --out runs/demo

clean:
	rm -rf runs .pytest_cache
