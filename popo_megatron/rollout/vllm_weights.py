"""Push HF-named weights into a running, colocated vLLM engine.

vLLM's in-process `reload_weights` takes checkpoint-format (HF) tensors and
re-shards them for its own TP layout. Two things it needs beyond an HF
checkpoint's tensors, both found by comparing log-probs after a sync:
- a tied model's `lm_head.weight`: the reload rebuilds the LM head as its own
  layer and keeps the old values when only the embedding arrives;
- a prefix-cache reset: cached KV blocks were computed with the old weights.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from popo_megatron.platform.vllm_compat import reload_weights

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def with_tied_lm_head(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights, plus `lm_head.weight` (the embedding) right after the embedding."""
    for name, tensor in weights:
        yield name, tensor
        if name == EMBEDDING:
            yield LM_HEAD, tensor


def reload_vllm_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]], tie_word_embeddings: bool) -> None:
    """Load `weights` (every tensor of the model, HF names) into the vLLM `LLM` and drop its stale caches."""
    if tie_word_embeddings:
        weights = with_tied_lm_head(weights)
    reload_weights(llm, weights)
    # vLLM only logs a failed reset and goes on: its cached KV blocks, computed with the old weights, would
    # then be served to prompts sharing a prefix. It fails while requests hold blocks.
    if not llm.reset_prefix_cache():
        raise RuntimeError(
            "vLLM could not reset its prefix cache after a weight sync (KV blocks still held by requests): "
            "cached blocks of the old weights would be reused. Weights must be synced with no request in flight."
        )
