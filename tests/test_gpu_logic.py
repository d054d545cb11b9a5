"""The logic of code paths that run only on a GPU, checked here with CUDA's calls stood in for (what runs
on a GPU is checked there by scripts/device_check.sh and tests/test_gpu.py):

- before the colocated engine wakes, the caching allocator's free blocks go back to the device (so vLLM's
  sleep-mode allocator can map them), then the engine wakes, and the free memory is logged;
- a packed micro-batch reaches the model in the THD layout with its sequences' boundaries (what
  Transformer Engine's attention reads on GPU; the local spec's, model/packed_attention.py, on CPU).
"""

from __future__ import annotations

import torch

from popo_megatron.platform import device


def test_the_cache_is_emptied_before_the_engine_wakes(monkeypatch, caplog):
    from popo_megatron.rollout.vllm_engine import VLLMEngine

    calls = []
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: calls.append("mem_get_info") or (3 * 2**30, 80 * 2**30))

    class Engine:  # vLLM's LLM, as far as waking goes
        def wake_up(self) -> None:
            calls.append("wake_up")

    engine = object.__new__(VLLMEngine)
    engine.llm, engine._asleep, engine._woken = Engine(), True, False
    with caplog.at_level("INFO", logger="popo.rollout"):
        engine.wake()
    assert calls == ["empty_cache", "mem_get_info", "wake_up"]
    assert "3.0 of 80.0 GiB free on the device" in caplog.text
    engine.wake()  # awake already: nothing
    assert calls == ["empty_cache", "mem_get_info", "wake_up"]


def test_on_cpu_nothing_is_released():
    assert device.release_cached_memory() is None


def test_a_pack_reaches_the_model_as_thd_with_its_sequences_boundaries():
    """What a packed micro-batch hands the model (algo/step.forward_micro_batch): no mask, the THD boundaries
    of its sequences (the padding after them as one-token sequences), positions restarting per sequence."""
    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import forward_micro_batch

    batch = make_policy_batch(
        [[1, 2], [3], [4, 5, 6]], [[7, 8], [9, 9, 9], [5]], torch.ones(3, 1), torch.ones(3, 1) > 0
    )
    pack = batch.packed([[0, 1, 2]], 16)  # 4 + 4 + 4 tokens, 4 of padding
    calls = []

    def model(tokens, positions, mask, **kwargs):
        calls.append((positions, mask, kwargs))
        return tokens.float()

    forward_micro_batch(model, pack)
    positions, mask, kwargs = calls[-1]
    assert mask is None and kwargs["packed_seq_params"].qkv_format == "thd"
    assert kwargs["packed_seq_params"].cu_seqlens_q.tolist() == [0, 4, 8, 12, 13, 14, 15, 16]
    assert kwargs["packed_seq_params"].max_seqlen_q == 4
    assert positions.tolist() == [[0, 1, 2, 3] * 4]  # the padding continues its own run
    forward_micro_batch(model, batch)  # padded rows: causal, no boundaries
    positions, mask, kwargs = calls[-1]
    assert mask is None and not kwargs and positions.shape == batch.tokens.shape
