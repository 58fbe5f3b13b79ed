# Two commands do everything on a fresh machine: `make demo` and `make test`. Each
# creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean app gpu-aot

DEMO_DIR ?= runs/demo

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# .venv plus the jax CUDA plugin, for `smartbrush-aot --target=h100|h200` (planning/gpus.py):
# its own site-packages first, then .venv's (a .pth file), so only the CUDA wheels install
# (~1.7 GB). `make gpu-aot` compiles configs/gpu_h100.py for both GPUs.
GPU_VENV := .venv-gpu-aot
$(GPU_VENV)/.installed: $(STAMP) requirements-gpu-aot.txt
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -c "import site, sys; d = site.getsitepackages()[0]; \
	  open(d + '/sb_main_venv.pth', 'w').write(sys.argv[1] + '\n')" \
	  "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -r requirements-gpu-aot.txt
	touch $@

gpu-aot: $(GPU_VENV)/.installed
	for gpu in h100 h200; do $(GPU_VENV)/bin/python -m smartbrush_jax.cli.aot --config=configs/gpu_h100.py \
	  --target=$$gpu --cached-latents --json bench/results/gpu_aot_$${gpu}_cached.json || true; done

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
test: $(STAMP) $(GPU_VENV)/.installed
	bash tests/setup_browser.sh
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

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
