# Two commands do all set-up on a fresh machine:
#   make demo   -- environment + demo model + a short ES run with mpiexec -n 2 on the CPU
#   make test   -- environment + the test suite
# The environment is a venv in .venv. TORCH pins the local CPU build; on a cluster,
# install es-mpi into an environment that already has the site's torch and MPI.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
NP     ?= 2
BIN     = $(VENV)/bin
DEMO    = demo

.PHONY: demo test env clean-demo

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[mpich,dev,demo]"
	touch $@

$(DEMO)/model/config.json: $(VENV)/.installed tools/prepare_demo_model.py
	$(BIN)/python tools/prepare_demo_model.py $(DEMO)/model

demo: $(VENV)/.installed $(DEMO)/model/config.json
	rm -f $(DEMO)/run.h5
	OMP_NUM_THREADS=1 $(BIN)/mpiexec -n $(NP) $(BIN)/es-mpi train \
	    --config es_mpi/presets/demo.toml --model $(DEMO)/model --run $(DEMO)/run.h5
	$(BIN)/es-mpi inspect $(DEMO)/run.h5

test: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO)
