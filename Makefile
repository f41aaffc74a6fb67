# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test venv benchmark clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/mace demo

# The real hosts (tests/test_hosts.py: A1111, Forge, ComfyUI, one CPU thread each, most of their time
# in one process) run beside the rest of the suite; both must pass. MACE_REAL_HOSTS=0 skips them.
test: $(VENV)/.installed
	@mkdir -p test-artifacts
	$(PY) -m pytest -q -rs tests/test_hosts.py > test-artifacts/hosts-pytest.log 2>&1 & hosts=$$!; \
	trap 'kill $$hosts 2>/dev/null' INT TERM; \
	$(PY) -m pytest -q -rs tests --ignore=tests/test_hosts.py; rest=$$?; \
	wait $$hosts; h=$$?; echo "--- tests/test_hosts.py (beside the rest)"; cat test-artifacts/hosts-pytest.log; \
	exit $$(( rest || h ))

benchmark: $(VENV)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) demo_out
