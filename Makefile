# Two commands do everything on a fresh machine: `make demo` and `make test`. Each
# creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean app

DEMO_DIR ?= runs/demo

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Trains the cpu_demo config on the bundled synthetic shapes (about 10 minutes on 2
# cores; resumes if runs/demo has a checkpoint), then inpaints held-out scenes at
# precision levels 0, 5 and 10 and prints where the PNGs are.
demo: $(STAMP)
	$(PY) -m smartbrush_jax.train --config=configs/cpu_demo.py --workdir=$(DEMO_DIR)
	$(PY) -m smartbrush_jax.cli.demo --workdir $(DEMO_DIR)

# tests/test_app_browser.py drives Chromium: tests/setup_browser.sh installs Debian's
# chromium and chromium-driver when they are missing (or says why it cannot; the test skips)
# both cores: a file's tests stay on one worker (its module fixtures are built once); the
# trained session fixtures are built once for both workers (tests/conftest.py: built_once)
test: $(STAMP)
	bash tests/setup_browser.sh
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check smartbrush_jax tests bench

# the inpainting web app on the demo run (make demo first): http://127.0.0.1:7860
app: $(STAMP)
	$(PY) -m smartbrush_jax.app --checkpoint $(DEMO_DIR)

bench: $(STAMP)
	$(PY) bench/unet_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
