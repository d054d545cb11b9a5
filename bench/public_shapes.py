"""config.json fields of public checkpoints, for planning layouts without their weights.

The example configs are validated against them (tests/test_examples.py) and the
twin-memory benchmark builds them on meta tensors (bench/bench_twin_memory.py).
"""

from __future__ import annotations

QWEN2 = ["Qwen2ForCausalLM"]

PUBLIC_SHAPES: dict[str, dict] = {
    # as `popo pretrained smollm2-135m-instruct` builds it (popo_megatron/model/pretrained.py)
    "smollm2-135m-instruct": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "llama2-7b": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    # the GPU check's throughput model (bench/bench_gpu_step.py)
    "qwen2.5-0.5b": dict(
        architectures=QWEN2,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        architectures=QWEN2,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    "qwen2.5-math-7b": dict(
        architectures=QWEN2,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "qwen2.5-32b": dict(
        architectures=QWEN2,
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
}
