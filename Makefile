# The course's two commands: `make lab` (learn) and `make test` (prove everything still runs).
# Both create .venv and install what they need on first use; nothing else has to be done first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PORT ?= 8888
IP ?= 127.0.0.1
LAB_ARGS ?=
RANKS ?= 4
# the package's extras `make install` installs (.ci/run adds browser, for the browser test)
EXTRAS ?= mpi
# mpiexec and jupyter of the course environment come first on PATH for everything make runs.
export PATH := $(BIN):$(PATH)
# On one machine MPI jobs start with MPICH's mpiexec.gforker, which listens on no network socket;
# SYNCML_NETWORK=1 (across machines) gives Hydra's mpiexec (syncml_lib/mpienv.py says what listens where).
# SYNCML_NETWORK=loopback: Hydra too, and every message through TCP on loopback (syncml_lib/mpienv.py).
MPIEXEC := $(BIN)/$(if $(filter 1 loopback,$(SYNCML_NETWORK)),mpiexec,mpiexec.gforker)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=300

.PHONY: install lab test test-unit test-notebooks notebooks exercises doctor bench clean

# JupyterLab's settings for the course (no news prompt over the notebook) go into the environment's own
# share/jupyter/lab/settings/overrides.json, not into the user's home. ipyparallel's cluster panel is
# switched off in the environment: the course starts its clusters from the notebook (start_mpi_cluster),
# and the panel's copy of each cluster in the server raced the kernel to remove its log files when it
# stopped, writing errors into the server's log.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

$(VENV)/.installed: pyproject.toml syncml_lib/jupyterlab_overrides.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/python -m ipykernel install --sys-prefix --name syncml --display-name "Python (syncml)"
	install -D -m 644 syncml_lib/jupyterlab_overrides.json $(LAB_OVERRIDES)
	$(BIN)/jupyter server extension disable --sys-prefix ipyparallel >/dev/null 2>&1
	$(BIN)/jupyter labextension disable --level=sys_prefix ipyparallel-labextension >/dev/null 2>&1
	touch $@

install: $(VENV)/.installed

## JupyterLab on the course, opened at notebooks/, on loopback only (IP=127.0.0.1, PORT=8888; LAB_ARGS="--no-browser" on a server)
lab: install
	$(BIN)/jupyter lab --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/notebooks \
		--ServerApp.ip=$(IP) --port=$(PORT) $(ROOT_FLAG) $(LAB_ARGS)

## Everything: unit tests under real mpiexec, nbval on notebooks/; solutions/ run under nbval through the
## grader (tests/test_grade.py: every solution's checks pass, an exercise notebook's fail; every stub fails
## its check in tests/test_exercises.py); ends with the time per chapter and the 20 slowest items
test: install
	$(BIN)/python -m pytest tests notebooks $(NBVAL) $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-notebooks: install
	$(BIN)/python -m pytest notebooks solutions exercises $(NBVAL) $(PYTEST_ARGS)

## Re-execute the chapter and solution notebooks in place, then regenerate the exercises
notebooks: install
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 \
		--ExecutePreprocessor.kernel_name=syncml $(or $(NB),notebooks/*.ipynb solutions/*.ipynb)
	$(MAKE) exercises

exercises: install
	$(BIN)/python -m syncml_lib.exercises build

doctor: install
	$(BIN)/python -m syncml_lib doctor

## Benchmarks against MPI's own: BENCH=allreduce (default), BENCH=ps, BENCH=data, BENCH=tasks, BENCH=train, BENCH=sync or BENCH=scaling;
## BENCH=engines (against ipyparallel's load-balanced view) starts its own plain engines, without mpiexec;
## a benchmark's options go in BENCH_ARGS, e.g. make bench BENCH=allreduce BENCH_ARGS="--max-size 1M"
BENCH ?= allreduce
BENCH_ARGS ?=
bench: install
	$(if $(filter engines,$(BENCH)),,$(MPIEXEC) -n $(RANKS)) $(BIN)/python -m syncml_lib.bench $(BENCH) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
