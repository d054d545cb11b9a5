"""The vLLM rollout engine, colocated in the training processes.

Every torchrun rank hosts its part of the engine in-process: vLLM's
`external_launcher` executor builds vLLM's own groups over the already
initialised torch.distributed world, so vLLM's TP group lives inside the
trainer's world (with `rollout.tensor_parallel_size` > 1 every rank of a vLLM
TP group must submit the same prompts). Facts this relies on (measured,
see the project's cpu-platform notes):

- the engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so
  weights are reloaded with a direct call, not a copy to another process;
- creating the engine is collective: every rank of the world creates it at
  the same point;
- vLLM's shutdown destroys the default process group unless told not to;
- engine start reseeds the process's random generators: they are restored,
  and sampling uses explicit per-request seeds instead;
- on CPU the KV cache is sized from the config and the OpenMP threads are set
  before start (popo_megatron.platform.vllm_engine_kwargs, set_engine_threads).

The tokenizer is never loaded by vLLM (token ids in, token ids out): prompts
are rendered and responses decoded by the trainer's own tokenizer, and the
stop tokens are given explicitly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.config.schema import setting_value
from popo_megatron.errors import UserError
from popo_megatron.logs import get_logger
from popo_megatron.logs import progress as progress_bar
from popo_megatron.platform import (
    capture_rng_state,
    engine_can_sleep,
    release_cached_memory,
    restore_rng_state,
    set_engine_threads,
    vllm_engine_kwargs,
)
from popo_megatron.platform.vllm_compat import keep_process_group_on_shutdown, shutdown_engine
from popo_megatron.rollout.engine import Generation, Response, SamplingSettings
from popo_megatron.rollout.vllm_weights import reload_vllm_weights

log = get_logger("rollout")


class VLLMEngine:
    """A vLLM engine over an HF model directory (the project's export or any HF checkpoint)."""

    def __init__(
        self,
        model_dir: str | Path,
        rollout_cfg: DictConfig,
        *,
        dtype: str,
        stop_token_ids: Sequence[int],
        tie_word_embeddings: bool,
        progress: bool = False,
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        keep_process_group_on_shutdown()
        set_engine_threads(rollout_cfg.cpu_threads)
        distributed = dist.is_initialized()
        if distributed:  # external_launcher reads the rank from the environment (mp.spawn does not set it)
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        from vllm import LLM

        rng = capture_rng_state()
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            seed=rollout_cfg.seed,
            skip_tokenizer_init=True,
            max_model_len=rollout_cfg.max_model_len,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            distributed_executor_backend="external_launcher" if distributed else None,
            logprobs_mode="processed_logprobs",  # log-probs after temperature, like the trainer's
            max_num_seqs=rollout_cfg.max_num_seqs,
            max_num_batched_tokens=rollout_cfg.max_num_batched_tokens,
            **vllm_engine_kwargs(rollout_cfg),
        )
        restore_rng_state(rng)
        self.stop_token_ids = list(stop_token_ids)
        self.tie_word_embeddings = tie_word_embeddings
        self.sleep_level = rollout_cfg.sleep_level
        self.progress = progress
        self._asleep = False
        self._woken = False  # the first wake's memory is logged at INFO, later ones at DEBUG

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings, seed: int) -> Generation:
        """`sampling.n` responses per prompt; prompt i is sampled with seed `seed + i`, so a batch is
        reproducible and prompts (and ranks, given distinct seeds) do not share random draws."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens,
                seed=seed + i,
                logprobs=0,
                stop_token_ids=self.stop_token_ids,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        start = time.perf_counter()
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=progress_bar if self.progress else False)
        seconds = time.perf_counter() - start
        responses = []
        for output in outputs:
            group = []
            for completion in output.outputs:
                tokens = list(completion.token_ids)
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)]
                group.append(Response(tokens, logprobs, "length" if completion.finish_reason == "length" else "stop"))
            responses.append(group)
        return Generation(responses, seconds)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        reload_vllm_weights(self.llm, weights, self.tie_word_embeddings)

    def sleep(self) -> None:
        if engine_can_sleep() and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            free = release_cached_memory()  # first: the engine maps its memory again from what is free
            self.llm.wake_up()
            self._asleep = False
            (log.info if not self._woken else log.debug)(f"rollout engine awake; before waking: {free}")
            self._woken = True

    def shutdown(self) -> None:
        shutdown_engine(self.llm)


def stop_token_ids(model_dir: str | Path) -> list[int]:
    """The end-of-sequence ids of an HF model directory (config.json and generation_config.json)."""
    import json

    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise UserError(f"{model_dir}: no eos_token_id in config.json or generation_config.json")
    return sorted(set(ids))


def vllm_engine(cfg: DictConfig, model_dir: str | Path, progress: bool = False) -> VLLMEngine:
    """The engine for the config's rollout settings over `model_dir` (collective: every rank calls it)."""
    from popo_megatron.model.hf_config import read_hf_config

    return VLLMEngine(
        model_dir,
        cfg.rollout,
        dtype=setting_value(cfg.model.params_dtype),
        stop_token_ids=stop_token_ids(model_dir),
        tie_word_embeddings=read_hf_config(model_dir).tie_word_embeddings,
        progress=progress,
    )
