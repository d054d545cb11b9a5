# One entry point per job. Each target sets up .venv first (fast when nothing changed).
PY := .venv/bin/python

.PHONY: setup setup-system demo parity test test-fast lint bench

setup:
	bash scripts/setup.sh

# shellcheck, Slurm and munge from Debian's packages, for the Slurm tests (needs root or sudo; no-op once there).
setup-system:
	bash scripts/setup_system.sh

# The main job: POPO on the synthetic arithmetic task with a tiny random Qwen2 (generated),
# real megatron-core, vLLM and math-verify on CPU; ends with a summary and outputs/tiny_cpu/learning_curve.png.
demo: setup
	.venv/bin/popo train examples/tiny_cpu.yaml

# Megatron-Core vs transformers logits of a tiny Qwen2 at TP=1, TP=2, TP=2+SP and PP=2.
parity: setup
	.venv/bin/popo parity

# Two pytest workers: a torchrun world of two ranks keeps the 2-core CI machine busy only part of the time
# (start-up, vLLM's engine, evaluation run on one core). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup setup-system
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup tests

# The edit loop: the tests that run in one process (no torchrun world, no popo train), under a minute.
FAST_TESTS := architecture batching config convert_errors data docs drift_control dynamic_sampling examples \
	gpu_logic literal_answers logbook losses mapping optimizer_state resume_plan run_lock signals untrusted word_problems
test-fast: setup
	$(PY) -m pytest $(foreach t,$(FAST_TESTS),tests/test_$(t).py)

lint: setup
	$(PY) -m ruff check popo_megatron tests bench tools

bench: setup
	$(PY) bench/bench_weight_loading.py
	$(PY) bench/bench_first_touch.py
	$(PY) bench/bench_conversion.py
	$(PY) bench/scale_32b.py
	$(PY) bench/bench_logprobs.py
	$(PY) bench/bench_twin_memory.py
	$(PY) bench/bench_reward.py
	$(PY) bench/bench_rollout.py --smollm2
	$(PY) bench/bench_train.py
