# One entry point per job. Each target sets up .venv first (fast when nothing changed).
PY := .venv/bin/python

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

# The main job (until the trainer lands): Megatron-Core vs transformers logits
# parity of a tiny Qwen2 at TP=1, TP=2, TP=2+SP and PP=2 on local processes.
demo: setup
	.venv/bin/popo parity

test: setup
	$(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check popo_megatron tests bench tools

bench: setup
	$(PY) bench/bench_weight_loading.py
	$(PY) bench/bench_conversion.py
	$(PY) bench/bench_logprobs.py
	$(PY) bench/bench_twin_memory.py
	$(PY) bench/bench_reward.py
	$(PY) bench/bench_rollout.py
