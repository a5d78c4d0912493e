# The two commands a newcomer needs:  `make serve`  (the service, on the built-in demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test system-deps lint clean

# Installs the project and its dev tools into a local virtual environment (re-runs when pyproject changes).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/transresnet serve

# Chromium and its driver for the browser test (Debian packages; needs root, skipped otherwise).
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
		else echo "not root: skipping chromium install (the browser test will be skipped)"; fi; \
	fi

test: $(STAMP) system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check transresnet index service tests benchmarks

clean:
	rm -rf $(VENV) .cache .pytest_cache
