"""Held-out evaluation during training (`eval.*`): avg@k on problems the run does not train on.

The live engine samples k responses per problem with the rollout's sampling
settings (at `eval.temperature` when set) and the same seeds at every
evaluation, so two evaluations differ only by the policy. Each result is
compared with the prompt-blind baseline (the best single answer for every
problem): a policy that learned only the answer distribution reaches that, and
no further.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from popo_megatron.data.datasets import load_dataset
from popo_megatron.data.problems import DataError, ProblemSet
from popo_megatron.data.prompts import drop_over_long, engine_context
from popo_megatron.evaluate import avg_by_kind, kinds_text, pass_at_k
from popo_megatron.model.hf_config import read_hf_config
from popo_megatron.trainer.rollout_records import heldout_file, response_records, write_records
from popo_megatron.trainer.rollouts import collect_groups


@dataclass
class HeldoutResult:
    step: int  # the rollout steps behind the policy evaluated (0: the initial model)
    avg_at_k: float
    pass_at_k: float
    k: int
    temperature: float
    problems: int
    prompt_blind: float  # the best prompt-blind answer's accuracy on the same problems
    seconds: float
    by_kind: dict[str, float] = field(default_factory=dict)  # avg@k per kind of problem (e.g. operation)

    def record(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"held-out after step {self.step}: avg@{self.k} {self.avg_at_k:.3f} pass@{self.k} {self.pass_at_k:.3f} "
            f"(T={self.temperature:g}; prompt-blind best {self.prompt_blind:.3f}; {self.problems} problems, "
            f"{self.seconds:.1f}s){kinds_text(self.by_kind)}"
        )


class HeldoutEvaluator:
    def __init__(self, cfg: DictConfig) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path, trust_remote_code=cfg.model.trust_remote_code)
        context = engine_context(cfg.rollout, read_hf_config(cfg.model.hf_path).max_position_embeddings)
        self.problems: ProblemSet = drop_over_long(load_dataset(cfg.data, cfg.eval.data), tokenizer, cfg.data, context)
        if not len(self.problems):
            raise DataError(f"eval.data={cfg.eval.data}: no problems")
        self.k = cfg.eval.k
        self.seed = cfg.eval.seed
        self.temperature = cfg.rollout.temperature if cfg.eval.temperature is None else cfg.eval.temperature
        self.cfg = OmegaConf.merge(cfg, {"rollout": {"n": self.k, "temperature": self.temperature}})
        self.prompt_blind = self.problems.prompt_blind_accuracy()

    def due(self, step: int) -> bool:
        """Whether to evaluate after `step` rollout steps (the start of a fresh run is the caller's)."""
        every = self.cfg.eval.every
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    def evaluate(self, engine, verifier, tokenizer, step: int) -> HeldoutResult:
        """Every held-out problem, k samples each, on every replica's share (collective). With
        train.save_rollouts, rank 0 writes the samples to OUTPUT_DIR/rollouts/heldout_step_NNNNNN.jsonl."""
        start = time.perf_counter()
        engine.wake()
        groups, _ = collect_groups(engine, verifier, tokenizer, self.problems.problems, self.cfg, self.seed)
        engine.sleep()
        if self.cfg.train.save_rollouts and (not dist.is_initialized() or dist.get_rank() == 0):
            write_records(self.cfg.train.output_dir, heldout_file(step), response_records(groups, tokenizer, step))
        correct = [sum(g.correct for g in group.grades) for group in groups]
        return HeldoutResult(
            step=step,
            avg_at_k=sum(correct) / (self.k * len(correct)),
            pass_at_k=sum(pass_at_k(self.k, c, self.k) for c in correct) / len(correct),
            k=self.k,
            temperature=self.temperature,
            problems=len(correct),
            prompt_blind=self.prompt_blind,
            seconds=time.perf_counter() - start,
            by_kind=avg_by_kind([p.kind for p in self.problems.problems], correct, self.k),
        )
