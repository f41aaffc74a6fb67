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

# make test includes the real hosts (tests/test_hosts.py: A1111, Forge, ComfyUI; MACE_REAL_HOSTS=0 leaves
# them out), one test after another: a host and its CLI reference hold ~16 GB, so not beside other jobs.
# One torch thread: the tests' models are tiny, and beside any other busy process OpenMP's spin-waiting
# threads made the suite 15x slower (tests/test_objectives.py: 16 s alone with 2 threads or 1, 233-298 s
# beside one busy process with 2 threads, 16 s with 1).
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs tests

benchmark: $(VENV)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) demo_out
