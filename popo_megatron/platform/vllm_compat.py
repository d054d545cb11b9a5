"""Every use of vLLM internals outside its public API, in one place.

Written against vLLM 0.32 (the CPU build) (the V1 engine in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`,
`external_launcher`). Each function says what it reaches into and why the public API does not do it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def keep_process_group_on_shutdown() -> None:
    """vLLM's shutdown calls `vllm.distributed.parallel_state.destroy_distributed_environment()`, which
    destroys the default process group: the trainer's, which vLLM only borrowed (external_launcher). The
    trainer tears its world down itself."""
    import vllm.distributed.parallel_state as vllm_parallel_state

    vllm_parallel_state.destroy_distributed_environment = lambda: None


def shutdown_engine(llm: Any) -> None:
    """Stop an in-process engine now (`LLM` has no public close: its engine core would otherwise live until
    garbage collection, holding the KV cache and the engine's threads)."""
    llm.llm_engine.engine_core.shutdown()


def reload_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load HF-named, checkpoint-format tensors into every worker of the engine: the workers'
    `reload_weights` through `LLM.collective_rpc`, which re-shards them for the engine's own TP layout."""
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights), is_checkpoint_format=True))
