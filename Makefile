# Two commands do all set-up on a fresh machine:
#   make demo   -- environment + demo model + a short ES run with mpiexec -n 2 on the CPU
#   make test   -- environment + the test suite
#   make test-min -- the lowest supported versions (tools/lowest-versions.txt) in .venv-min,
#                   on a small fast part of the suite (CI runs it after make test)
# The environment is a venv in .venv. TORCH pins the local CPU build; on a cluster,
# install es-mpi into an environment that already has the site's torch and MPI.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
NP     ?= 2
BIN     = $(VENV)/bin
VENV_MIN ?= .venv-min
MIN_BIN  = $(VENV_MIN)/bin
DEMO    = demo

.PHONY: demo test test-min env clean-demo

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[mpich,dev,demo,rl,track]"
	touch $@

$(DEMO)/model/config.json: $(VENV)/.installed tools/prepare_demo_model.py
	$(BIN)/python tools/prepare_demo_model.py $(DEMO)/model

demo: $(VENV)/.installed $(DEMO)/model/config.json
	rm -f $(DEMO)/run.h5
	OMP_NUM_THREADS=1 $(BIN)/mpiexec -n $(NP) $(BIN)/es-mpi train \
	    --config es_mpi/presets/demo.toml --model $(DEMO)/model --run $(DEMO)/run.h5
	$(BIN)/es-mpi inspect $(DEMO)/run.h5

test: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs --durations=25

# Built anew whenever the pins change (the environment is then exactly the pins).
# mpi4py 3.1.4 has no wheel: it compiles against the mpich wheel's mpicc (installed first,
# on PATH), with a setuptools old enough for its setup.py (a build constraint only), and
# never from pip's wheel cache: a wheel built in another venv links that venv's libmpi.
$(VENV_MIN)/.installed: tools/lowest-versions.txt pyproject.toml
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(MIN_BIN)/python -m pip install -q --upgrade pip
	$(MIN_BIN)/python -m pip install -q "$(TORCH)" mpich
	printf 'setuptools<70\n' > $(VENV_MIN)/build-constraints.txt
	PATH="$(CURDIR)/$(MIN_BIN):$$PATH" $(MIN_BIN)/python -m pip install -q --no-cache-dir \
	    --build-constraint $(VENV_MIN)/build-constraints.txt -r tools/lowest-versions.txt
	$(MIN_BIN)/python -m pip install -q --no-deps -e .
	touch $@

# Llama and GPT-2 end to end in both modes (2 ranks, resume, export), Qwen3 and Gemma 3
# (the newest architectures) in full mode, the lowrank forward of all nine against
# materialized weights, greedy decoding whatever a generation_config.json asks for, and
# model checks that lean on transformers. About 75 s of tests on 2 cores. Left out: the
# guard that plain transformers does apply a hostile generation config (4.56's own
# generate fails on it, NaN probabilities in beam sampling, instead of decoding otherwise).
ARCH_TEST = tests/test_architectures.py::test_architecture_end_to_end
MIN_TESTS = \
	"$(ARCH_TEST)[llama-full]" "$(ARCH_TEST)[llama-lowrank]" \
	"$(ARCH_TEST)[gpt2-full]" "$(ARCH_TEST)[gpt2-lowrank]" \
	"$(ARCH_TEST)[qwen3-full]" "$(ARCH_TEST)[gemma3-full]" \
	tests/test_lowrank.py \
	tests/test_greedy.py::test_a_hostile_generation_config_scores_as_the_same_weights_without_it \
	tests/test_models.py::test_non_causal_models_are_refused_from_their_config \
	tests/test_models.py::test_a_tokenizer_without_pad_token_evaluates_as_with_one

test-min: $(VENV_MIN)/.installed
	$(MIN_BIN)/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|tokenizers|numpy|h5py|safetensors|click|matplotlib|mpi4py) '
	PATH="$(CURDIR)/$(MIN_BIN):$$PATH" OMP_NUM_THREADS=1 $(MIN_BIN)/python -m pytest -q \
	    -p no:cacheprovider $(MIN_TESTS)

clean-demo:
	rm -rf $(DEMO)
