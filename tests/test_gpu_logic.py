"""The logic of code paths that run only on a GPU, checked here with CUDA's calls stood in for (what runs
on a GPU is checked there by scripts/device_check.sh and tests/test_gpu.py):

- before the colocated engine wakes, the caching allocator's free blocks go back to the device (so vLLM's
  sleep-mode allocator can map them), then the engine wakes, and the free memory is logged;
- a packed micro-batch reaches Transformer Engine's attention in the THD layout with its sequences'
  boundaries (the local spec gets the block mask instead).
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


def test_a_pack_reaches_transformer_engine_as_thd_and_the_local_spec_as_a_mask():
    """What a packed micro-batch hands the model (algo/step.forward_micro_batch): with Transformer Engine's
    attention no mask and the THD boundaries of its sequences (the padding after them one more), with the
    local spec the block-diagonal mask; positions restart per sequence either way."""
    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.packing import block_causal_mask
    from popo_megatron.algo.step import forward_micro_batch

    batch = make_policy_batch(
        [[1, 2], [3], [4, 5, 6]], [[7, 8], [9, 9, 9], [5]], torch.ones(3, 1), torch.ones(3, 1) > 0
    )
    pack = batch.packed([[0, 1, 2]], 16)  # 4 + 4 + 4 tokens, 4 of padding
    calls = []

    def model(tokens, positions, mask, **kwargs):
        calls.append((positions, mask, kwargs))
        return tokens.float()

    forward_micro_batch(model, pack, te_attention=True)
    positions, mask, kwargs = calls[-1]
    assert mask is None and kwargs["packed_seq_params"].qkv_format == "thd"
    assert kwargs["packed_seq_params"].cu_seqlens_q.tolist() == [0, 4, 8, 12, 16]
    assert positions.tolist() == [[0, 1, 2, 3] * 4]
    forward_micro_batch(model, pack, te_attention=False)
    positions, mask, kwargs = calls[-1]
    assert torch.equal(mask, block_causal_mask(pack.layout.index)) and not kwargs
    forward_micro_batch(model, batch, te_attention=True)  # padded rows: causal, no boundaries
    positions, mask, kwargs = calls[-1]
    assert mask is None and not kwargs and positions.shape == batch.tokens.shape
