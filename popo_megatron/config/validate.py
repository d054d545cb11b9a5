"""Cross-field and model-dependent checks, run before any heavy work.

All problems are collected and reported together, each naming its key.
"""

from __future__ import annotations

from omegaconf import DictConfig

from popo_megatron.config.load import ConfigError
from popo_megatron.data.prompts import PLACEHOLDER
from popo_megatron.data.synthetic import MAX_PROBLEMS, OPERATIONS, ArithmeticTask
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.reward.extract import FALLBACKS
from popo_megatron.rollout.seeds import MAX_ROUNDS


def validate_config(
    cfg: DictConfig,
    world_size: int,
    model: HFModelArgs | None = None,
    cuda_available: bool | None = None,
    te_installed: bool | None = None,
) -> None:
    """Raise ConfigError listing every problem of `cfg` for this world size and model
    (`cuda_available` and `te_installed`, Transformer Engine, default to what this machine has)."""
    if cuda_available is None:
        from popo_megatron.platform import cuda_available as machine_has_cuda

        cuda_available = machine_has_cuda()
    if te_installed is None:
        from popo_megatron.platform.device import transformer_engine_installed

        te_installed = transformer_engine_installed()
    problems: list[str] = []
    par = cfg.parallel
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    for key, value in (
        ("tensor_model_parallel_size", tp),
        ("pipeline_model_parallel_size", pp),
        ("context_parallel_size", cp),
    ):
        if value < 1:
            problems.append(f"parallel.{key}={value}: must be >= 1")
    if cfg.model.make_vocab_size_divisible_by < 1:
        problems.append(f"model.make_vocab_size_divisible_by={cfg.model.make_vocab_size_divisible_by}: must be >= 1")
    if problems:  # the rules below divide by these
        raise ConfigError(_one_line(problems))

    if world_size % cfg.rollout.tensor_parallel_size != 0:
        problems.append(
            f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size} does not divide the world size "
            f"{world_size} (each vLLM engine spans that many ranks)"
        )
    if world_size % (tp * pp * cp) != 0:
        problems.append(
            f"parallel: world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size x context_parallel_size = {tp} x {pp} x {cp} = {tp * pp * cp}"
        )
    if par.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    budget = cfg.train.max_tokens_per_microbatch
    if cp > 1 and budget is None:
        problems.append(
            f"parallel.context_parallel_size={cp} splits packed sequences: set train.max_tokens_per_microbatch"
        )
    elif cp > 1 and budget % (2 * cp):
        problems.append(
            f"train.max_tokens_per_microbatch={budget} must be a multiple of 2 x parallel.context_parallel_size = "
            f"{2 * cp} (each CP rank holds two equal chunks of every sequence)"
        )

    spec = cfg.model.spec  # a str Enum: compares equal to its value
    if not cuda_available:
        if spec == "te":
            problems.append("model.spec=te needs CUDA and Transformer Engine; use 'auto' or 'local' on this machine")
        if cfg.model.fp8.enabled:
            problems.append("model.fp8.enabled=true needs CUDA and Transformer Engine (not available on this machine)")
    elif not te_installed and (spec == "te" or cfg.model.fp8.enabled):
        what = "model.spec=te" if spec == "te" else "model.fp8.enabled=true"
        problems.append(f"{what} needs Transformer Engine, which is not installed here: install the gpu extra")
    elif cfg.model.fp8.enabled and spec == "local":
        problems.append("model.fp8.enabled=true needs the Transformer Engine layer spec (model.spec=te or auto)")
    if cuda_available and cp > 1 and (spec == "local" or not te_installed):
        problems.append(
            f"parallel.context_parallel_size={cp} on GPU needs Transformer Engine's attention (model.spec=te or "
            "auto, the gpu extra installed): the local spec's CP path gathers whole sequences (a CPU correctness path)"
        )

    problems += _algorithm_problems(cfg)
    copy = _policy_copy(cfg)
    if copy and cfg.model.fp8.enabled and cfg.model.fp8.fp8_weights:
        problems.append(
            f"model.fp8.fp8_weights=true with {copy}: a copy of the policy (its EMA or swap) needs high-precision "
            "parameters (use FP8 compute with fp8_weights=false)"
        )

    if model is not None:
        if model.num_attention_heads % tp != 0:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide the model's "
                f"{model.num_attention_heads} attention heads"
            )
        kv = model.num_kv_heads
        if kv % tp != 0 and tp % kv != 0:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp}: the model's {kv} query groups (KV heads) can be "
                f"neither split across TP (TP must divide {kv}) nor replicated (TP must be a multiple of {kv})"
            )
        if model.num_layers % pp != 0:
            problems.append(
                f"parallel.pipeline_model_parallel_size={pp} does not divide the model's {model.num_layers} layers"
            )
        if model.hidden_size % tp != 0 or model.intermediate_size % tp != 0:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide hidden_size={model.hidden_size} "
                f"and intermediate_size={model.intermediate_size}"
            )
    if problems:
        raise ConfigError(_one_line(problems))


def _one_line(problems: list[str]) -> str:
    """The problems as one message line (a console error is one line), each naming its key."""
    return "invalid config: " + "; ".join(problems)


def _algorithm_problems(cfg: DictConfig) -> list[str]:
    """Ranges of the algorithm, loss and optimiser settings."""
    checks = [
        ("popo.is_bound.eps_high", cfg.popo.is_bound.eps_high > 0, "must be > 0"),
        ("popo.is_bound.truncate_c", cfg.popo.is_bound.truncate_c > 0, "must be > 0"),
        ("popo.alpha", cfg.popo.alpha >= 0, "must be >= 0 (0: no similarity term)"),
        ("popo.beta_ent", cfg.popo.beta_ent >= 0, "must be >= 0 (0: no entropy bonus)"),
        ("popo.weight_temperature", cfg.popo.weight_temperature > 0, "must be > 0"),
        ("popo.low_entropy_warning", cfg.popo.low_entropy_warning >= 0, "must be >= 0 (0: off)"),
        ("popo.predictor.hidden", cfg.popo.predictor.hidden >= 1, "must be >= 1"),
        ("popo.predictor.layers", cfg.popo.predictor.layers >= 2, "must be >= 2 (Linear, LayerNorm, ReLU, Linear)"),
        ("popo.predictor.noise_std", cfg.popo.predictor.noise_std >= 0, "must be >= 0"),
        ("popo.predictor.lr", cfg.popo.predictor.lr is None or cfg.popo.predictor.lr >= 0, "must be >= 0 (or null)"),
        ("popo.target.tau", 0 <= cfg.popo.target.tau <= 1, "must be in [0, 1] (1: a frozen target)"),
        ("popo.target.kl_every", cfg.popo.target.kl_every >= 0, "must be >= 0 (0: never)"),
        ("loss.tis_cap", cfg.loss.tis_cap > 0, "must be > 0"),
        ("grpo.eps_low", 0 < cfg.grpo.eps_low < 1, "must be in (0, 1)"),
        ("grpo.eps_high", cfg.grpo.eps_high > 0, "must be > 0"),
        ("grpo.kl_beta", cfg.grpo.kl_beta >= 0, "must be >= 0"),
        ("loss.logprob_chunk_tokens", cfg.loss.logprob_chunk_tokens >= 1, "must be >= 1"),
        ("optim.lr", cfg.optim.lr >= 0, "must be >= 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.adam_beta1", 0 <= cfg.optim.adam_beta1 < 1, "must be in [0, 1)"),
        ("optim.adam_beta2", 0 <= cfg.optim.adam_beta2 < 1, "must be in [0, 1)"),
        ("optim.adam_eps", cfg.optim.adam_eps > 0, "must be > 0"),
        ("optim.clip_grad", cfg.optim.clip_grad >= 0, "must be >= 0 (0: no clipping)"),
        ("optim.ddp_bucket_size", cfg.optim.ddp_bucket_size is None or cfg.optim.ddp_bucket_size >= 1, "must be >= 1"),
        ("reward.workers", cfg.reward.workers >= 1, "must be >= 1"),
        ("rollout.n", cfg.rollout.n >= 1, "must be >= 1"),
        ("rollout.temperature", cfg.rollout.temperature > 0, "must be > 0 (the loss divides the logits by it)"),
        ("rollout.top_p", 0 < cfg.rollout.top_p <= 1, "must be in (0, 1]"),
        ("rollout.max_tokens", cfg.rollout.max_tokens >= 1, "must be >= 1"),
        ("rollout.tensor_parallel_size", cfg.rollout.tensor_parallel_size >= 1, "must be >= 1"),
        ("rollout.max_num_seqs", cfg.rollout.max_num_seqs is None or cfg.rollout.max_num_seqs >= 1, "must be >= 1"),
        (
            "rollout.max_num_batched_tokens",
            cfg.rollout.max_num_batched_tokens is None or cfg.rollout.max_num_batched_tokens >= 1,
            "must be >= 1",
        ),
        ("train.steps", cfg.train.steps >= 1, "must be >= 1"),
        ("train.prompts_per_step", cfg.train.prompts_per_step >= 1, "must be >= 1"),
        ("train.mini_batches", cfg.train.mini_batches >= 1, "must be >= 1"),
        ("train.micro_batch_size", cfg.train.micro_batch_size >= 1, "must be >= 1"),
        (
            "train.max_tokens_per_microbatch",
            cfg.train.max_tokens_per_microbatch is None or cfg.train.max_tokens_per_microbatch >= 2,
            "must be >= 2 (a prompt token and a response token; or null: padded rows)",
        ),
        ("train.keep_last", cfg.train.keep_last >= 1, "must be >= 1"),
        ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps >= 1, "must be >= 1"),
        (
            "train.checkpoint_every_minutes",
            cfg.train.checkpoint_every_minutes is None or cfg.train.checkpoint_every_minutes > 0,
            "must be > 0 (or null: by steps only)",
        ),
        (
            "train.max_wall_time_s",
            cfg.train.max_wall_time_s is None or cfg.train.max_wall_time_s > 0,
            "must be > 0 (or null: no limit)",
        ),
        (
            "data.dynamic_sampling_max_rounds",
            1 <= cfg.data.dynamic_sampling_max_rounds <= MAX_ROUNDS,
            f"must be in [1, {MAX_ROUNDS}]",
        ),
        ("optim.min_lr", 0 <= cfg.optim.min_lr <= cfg.optim.lr, f"must be in [0, optim.lr={cfg.optim.lr}]"),
        ("data.synthetic.size", cfg.data.synthetic.size >= 0, "must be >= 0 (0: the whole split)"),
        ("data.synthetic.min_operand", cfg.data.synthetic.min_operand >= 0, "must be >= 0"),
        (
            "data.synthetic.max_operand",
            cfg.data.synthetic.max_operand >= cfg.data.synthetic.min_operand,
            f"must be >= data.synthetic.min_operand={cfg.data.synthetic.min_operand}",
        ),
        ("data.synthetic.operands", cfg.data.synthetic.operands >= 1, "must be >= 1"),
        (
            "data.synthetic.operations",
            bool(cfg.data.synthetic.operations) and set(cfg.data.synthetic.operations) <= set(OPERATIONS),
            f"must be a non-empty string of {OPERATIONS!r}",
        ),
        (
            "data.synthetic",
            _synthetic_count(cfg.data.synthetic) <= MAX_PROBLEMS,
            f"(max_operand - min_operand + 1)^operands x len(operations)^(operands - 1) problems must be <= "
            f"{MAX_PROBLEMS}",
        ),
        ("eval.k", cfg.eval.k >= 1, "must be >= 1"),
        ("eval.temperature", cfg.eval.temperature is None or cfg.eval.temperature > 0, "must be > 0 (or null)"),
        ("eval.every", cfg.eval.every >= 0, "must be >= 0 (0: only at the start and the end)"),
        ("reward.timeout_s", cfg.reward.timeout_s >= 1, "must be >= 1 (math-verify's alarm counts whole seconds)"),
        ("reward.worker_memory_mb", cfg.reward.worker_memory_mb >= 256, "must be >= 256"),
    ]
    law = cfg.popo.target.adaptive
    for key in ("m_min", "m_max"):
        checks.append((f"popo.target.adaptive.{key}", 0 <= law[key] <= 1, "must be in [0, 1]"))
    adaptive_alpha = cfg.popo.adaptive_alpha
    checks += [
        ("popo.target.adaptive.m_min", law.m_min <= law.m_max, f"must be <= m_max ({law.m_max})"),
        ("popo.target.adaptive.kappa", law.kappa >= 0, "must be >= 0"),
        ("popo.target.adaptive.max_log_step", law.max_log_step > 0, "must be > 0"),
        ("popo.target.adaptive.d_target", 0 < law.d_target <= 2, "must be in (0, 2] (the drift's range)"),
        ("popo.per_token.predictor_lr", cfg.popo.per_token.predictor_lr >= 0, "must be >= 0"),
        ("popo.adaptive_alpha.kappa", adaptive_alpha.kappa >= 0, "must be >= 0"),
        ("popo.adaptive_alpha.max_log_step", adaptive_alpha.max_log_step > 0, "must be > 0"),
        (
            "popo.adaptive_alpha.alpha_min",
            0 < adaptive_alpha.alpha_min <= adaptive_alpha.alpha_max,
            f"must be in (0, alpha_max={adaptive_alpha.alpha_max}] (a multiplicative law cannot leave 0)",
        ),
        ("rollout.top_k", cfg.rollout.top_k >= 0, "must be >= 0 (0: off)"),
    ]
    problems = [f"{key}={_value(cfg, key)}: {reason}" for key, ok, reason in checks if not ok]
    template = cfg.data.prompt_template
    if template is not None and PLACEHOLDER not in template:
        problems.append(f"data.prompt_template={template!r}: must contain {PLACEHOLDER}")
    unknown = [name for name in cfg.reward.answer_fallbacks if name not in FALLBACKS]
    if unknown:
        problems.append(f"reward.answer_fallbacks: unknown {unknown}; choose from {list(FALLBACKS)}")
    if cfg.loss.rollout_correction == "tis" and cfg.loss.old_logprobs == "rollout":
        problems.append(
            "loss.rollout_correction=tis corrects the trainer's old log-probs against the engine's: "
            "it needs loss.old_logprobs=trainer"
        )
    problems += _ratio_problems(cfg)
    popo = cfg.popo
    no_target = popo.alpha == 0 and not popo.adaptive_alpha.enabled
    if cfg.algorithm == "popo" and no_target and popo.target.schedule == "adaptive":
        problems.append(
            "popo.target.schedule=adaptive with popo.alpha=0: without the similarity term there is no EMA target "
            "and no drift for the law to follow; set popo.alpha > 0 or popo.target.schedule=constant"
        )
    return problems


def _ratio_problems(cfg: DictConfig) -> list[str]:
    """Truncated sampling (top_p < 1, top_k > 0) renormalises the engine's log-probs over the kept tokens
    while the trainer's cover the whole vocabulary: a ratio between them carries the kept mass, not the
    policy's change. Until the sampling mask is replayed in the trainer, no rollout log-prob may enter a ratio."""
    truncated = [
        f"{key}={value}"
        for key, value, on in (
            ("rollout.top_p", cfg.rollout.top_p, cfg.rollout.top_p < 1),
            ("rollout.top_k", cfg.rollout.top_k, cfg.rollout.top_k > 0),
        )
        if on
    ]
    users = [
        f"{key}={value}"
        for key, value, on in (
            ("loss.old_logprobs", "rollout", cfg.loss.old_logprobs == "rollout"),
            ("loss.rollout_correction", "tis", cfg.loss.rollout_correction == "tis"),
        )
        if on
    ]
    return [
        f"{user} with {sampling}: the engine's log-probs are renormalised over the tokens truncated sampling "
        "keeps and the trainer's are not, so the importance ratio would carry the kept probability mass instead "
        f"of the policy's change; use loss.old_logprobs=trainer and loss.rollout_correction=none, or sample "
        "without truncation (rollout.top_p=1, rollout.top_k=0)"
        for user in users
        for sampling in truncated
    ]


def _policy_copy(cfg: DictConfig) -> str | None:
    """The setting that keeps a copy of the policy beside it (POPO's EMA target, GRPO's reference), if any."""
    if cfg.algorithm == "popo" and (cfg.popo.alpha > 0 or cfg.popo.adaptive_alpha.enabled):
        return f"popo.alpha={cfg.popo.alpha} (the EMA target)"
    if cfg.algorithm == "grpo" and cfg.grpo.kl_beta > 0:
        return f"grpo.kl_beta={cfg.grpo.kl_beta} (the reference policy)"
    return None


def _value(cfg: DictConfig, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def _synthetic_count(synthetic_cfg: DictConfig) -> int:
    if synthetic_cfg.operands < 1:
        return 0  # reported by its own check
    return ArithmeticTask.from_config(synthetic_cfg).count()
