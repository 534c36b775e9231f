# One command sets everything up and runs the main job; one sets everything up and runs the tests.
# Both are idempotent: the venv, the package and the cached model/corpus are only built when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_VQ_CACHE ?= $(CURDIR)/.cache/hf_vq
export TOKENIZERS_PARALLELISM := false
export OMP_DYNAMIC := FALSE
export MKL_DYNAMIC := FALSE

.PHONY: setup assets demo test unit integration bench docs clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first and pinned, so nothing below can pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]" torch==2.13.0
	touch $@

setup: $(VENV)/.installed

assets: setup
	$(PY) -m hf_vq.assets --cache $(HF_VQ_CACHE)

demo: assets
	$(PY) examples/demo.py

test: assets
	$(VENV)/bin/lint-imports --no-cache
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q
	$(PY) -m pytest -q tests integration_tests

unit: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q tests

bench: assets
	$(PY) benchmarks/quality.py --rows fp,rtn4,gptq4-small,gptq3-small,gptq4,gptq3

# The site (build/site) is built from docs/ and mkdocs.yml; the config and API reference pages are generated from
# the code at build time (docs/hooks/generated_pages.py). --strict: a broken link or reference fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info
