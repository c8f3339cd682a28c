# trime developer entry points. Everything runs inside the virtualenv at .venv.
#   make demo   - prepare the shipped sample, train a tiny CE baseline and a tiny TrimeLM, compare
#   make test       - the whole test suite (every tier; CI runs it)
#   make test-fast  - the tests not marked slow (pytest.ini): under 2 minutes on 2 cores
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DEPS_STAMP := $(VENV)/.trime-deps
INSTALL_STAMP := $(VENV)/.trime-installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv install demo test test-fast reproduce reproduce-enwik8 real-model bench lint clean gpu-bringalong gpu-check

$(DEPS_STAMP): requirements.txt requirements-hf.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION) numpy cython
	# fairseq-fixed is built against the torch above and must not pull torchaudio/another torch
	$(PIP) install -q --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	# the [hf] extra (trime.hf, trime-hf-train), so that `make test` runs the Hugging Face tests too
	$(PIP) install -q -r requirements-hf.txt
	touch $@

venv: $(DEPS_STAMP)

# Editable install for development; the autoload .pth that `pip install .` places by
# itself (setup.py build_py) is copied by hand because editable wheels skip it.
$(INSTALL_STAMP): $(DEPS_STAMP) setup.py trime-fairseq-autoload.pth
	$(PIP) install -q --no-deps --no-build-isolation -e .
	cp trime-fairseq-autoload.pth $(SITE)/
	touch $@

install: $(INSTALL_STAMP)

demo: $(INSTALL_STAMP)
	$(PY) -m trime.demo

# pytest exits 5 when it collects nothing (e.g. a -k filter): say so, do not fail.
PYTEST_NOTHING_IS_OK = rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

# two pytest workers (pytest-xdist), whole test files each, so that module fixtures are built once
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(PYTEST_WORKERS) --dist loadfile

test: $(INSTALL_STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL) tests $(PYTEST_ARGS); $(PYTEST_NOTHING_IS_OK)

# the fast tier: whole pipelines, training chains, distributed and end-to-end CLI runs are marked slow
test-fast: $(INSTALL_STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL) -m "not slow" tests $(PYTEST_ARGS); $(PYTEST_NOTHING_IS_OK)

# bench/ is a package: its scripts run from the repository root as modules
reproduce: $(INSTALL_STAMP)
	$(PY) -m bench.reproduce

reproduce-enwik8: $(INSTALL_STAMP)
	$(PY) -m bench.reproduce --dataset enwik8-prefix

# the paper's comparison on a real pretrained LM (SmolLM2-135M from the package index, LoRA fine-tuning)
real-model: $(INSTALL_STAMP)
	$(PY) -m bench.real_model

# loss time/memory, then training words/s of every criterion (byte and word level)
bench: $(INSTALL_STAMP)
	$(PY) -m bench.loss
	$(PY) -m bench.train --data enwik8 --tag enwik8-small
	$(PY) -m bench.train --data wikitext-2 --tag wikitext-2-reproduce --layers 3

# GPU check (one prepared script per device lease; bench/README.md): fill the bring-along folder here, where pip reaches the
# package index; on the device machine (no index, no .venv) `make gpu-check` installs it and runs the check.
GPU_BRINGALONG ?= .gpu-bringalong
gpu-bringalong:
	PY=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash bench/gpu_bringalong.sh $(GPU_BRINGALONG)

gpu-check:
	GPU_BRINGALONG=$(GPU_BRINGALONG) bash bench/gpu_check.sh

# ruff, then the import contracts of .importlinter on the installed layout (data_prep/,
# retrieval/ and eval/ become trime.data_prep, trime.retrieval and trime.eval there).
LINT_TREE := build/lint
lint: $(INSTALL_STAMP)
	$(VENV)/bin/ruff check .
	rm -rf $(LINT_TREE) && mkdir -p $(dir $(LINT_TREE)) && $(PY) setup.py -q build_py --build-lib $(LINT_TREE) > $(LINT_TREE).log 2>&1 || { cat $(LINT_TREE).log; exit 1; }
	cd $(LINT_TREE) && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/.importlinter --no-cache

clean:
	rm -rf $(VENV) build *.egg-info demo-out reproduce*-work
