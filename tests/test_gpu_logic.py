"""The logic of code paths that run only on a GPU, checked here with CUDA's calls stood in for (what runs
on a GPU is checked there by scripts/device_check.sh and tests/test_gpu.py):

- before the colocated engine wakes, the caching allocator's free blocks go back to the device (so vLLM's
  sleep-mode allocator can map them), then the engine wakes, and the free memory is logged.
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
