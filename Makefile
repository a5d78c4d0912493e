# The two commands a newcomer needs:  `make serve`  (the service, on the built-in demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve serve-flickr8k test test-fast system-deps lint clean

# Installs the project and its dev tools into a local virtual environment (re-runs when pyproject changes).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/transresnet serve

# The real-photo demo: Flickr8k photos in ten voices, EfficientNet-Lite2 (built once, cached in .cache/demo/).
# Photos from DATA (default ../shared/data/flickr8k-1k where it exists), else downloaded once (about 1.1 GB).
DATA ?= $(wildcard ../shared/data/flickr8k-1k)
serve-flickr8k: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/transresnet serve --demo flickr8k $(if $(DATA),--data $(DATA))

# Chromium and its driver for the browser test (Debian packages; needs root, skipped otherwise).
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
		else echo "not root: skipping chromium install (the browser test will be skipped)"; fi; \
	fi

# Everything: what CI runs (tests marked slow, browser and shared included; shared ones skip without ../shared).
test: $(STAMP) system-deps
	$(BIN)/python -m pytest

# The development lane: under a minute, no browser, no tests over a minute, no ../shared data.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser and not shared"

# Style (ruff) and the layering rule (core <- index <- service <- cli; tests/test_layers.py).
lint: $(STAMP)
	$(BIN)/ruff check transresnet index service configs tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
