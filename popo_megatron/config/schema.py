"""Structured configuration: one dataclass per concern.

Every key a user can set lives here with its type and default. OmegaConf turns
these dataclasses into a typed schema, so YAML files and `key.sub=value`
overrides are checked against it (unknown keys and wrong types are rejected by
`popo_megatron.config.load`); cross-field and model-dependent rules live in
`popo_megatron.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


def setting_value(setting: Enum | str) -> str:
    """The text of an enum-typed setting, for a library that takes strings. OmegaConf gives the Enum member
    (every enum here is a str Enum, so comparisons with strings and members work either way); a test or a
    plain dict may give the string itself."""
    return setting.value if isinstance(setting, Enum) else str(setting)


class ParamsDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LayerSpec(str, Enum):
    auto = "auto"  # Transformer Engine spec on CUDA when it is installed, local (torch) spec otherwise
    te = "te"
    local = "local"


class FP8Format(str, Enum):
    hybrid = "hybrid"  # E4M3 forward, E5M2 backward (the usual training choice)
    e4m3 = "e4m3"


class FP8Recipe(str, Enum):
    delayed = "delayed"
    tensorwise = "tensorwise"
    blockwise = "blockwise"
    mxfp8 = "mxfp8"


class AmaxComputeAlgo(str, Enum):
    max = "max"
    most_recent = "most_recent"


@dataclass
class FP8Config:
    """Transformer Engine FP8 settings (GPU only; rejected on a machine without CUDA)."""

    enabled: bool = False  # FP8 compute in the linear layers
    format: FP8Format = FP8Format.hybrid  # the FP8 formats of the forward and the backward
    recipe: FP8Recipe = FP8Recipe.delayed  # Transformer Engine's scaling recipe
    margin: int = 0  # the scaling factor's margin (powers of 2)
    amax_history_len: int = 1024  # steps of amax history (delayed scaling)
    amax_compute_algo: AmaxComputeAlgo = AmaxComputeAlgo.max  # delayed scaling only
    fp8_weights: bool = False  # keep the parameters themselves in FP8 (TE fp8_model_init)


@dataclass
class ModelConfig:
    # A Hugging Face checkpoint directory: config.json plus *.safetensors (sharded or not).
    hf_path: str = "???"
    params_dtype: ParamsDtype = ParamsDtype.float32  # the parameters' dtype (bf16 on GPU; fp32 on CPU)
    # The vocabulary is padded to a multiple of lcm(this, TP) so that the padded
    # size does not change with TP whenever TP divides it (checkpoints reshard freely).
    make_vocab_size_divisible_by: int = 128
    spec: LayerSpec = LayerSpec.auto  # the layer implementation
    fp8: FP8Config = field(default_factory=FP8Config)
    # Run the checkpoint's own tokenizer code (never by default; only config.json is read for the model).
    trust_remote_code: bool = False


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # TP: each layer's weights split over this many ranks
    pipeline_model_parallel_size: int = 1  # PP: the layers split into this many stages
    sequence_parallel: bool = False  # split the activations outside attention and MLP along the sequence (needs TP > 1)
    # CP: each packed sequence split over this many ranks (needs train.max_tokens_per_microbatch; on GPU,
    # Transformer Engine's attention; on CPU a correctness path that does not divide attention's work).
    context_parallel_size: int = 1


# --- The algorithm (docs/algorithm.md). `algorithm` picks the objective (popo_megatron/objectives/); each
# objective reads its own section (`popo`, `grpo`) and the shared `loss` section.


class Algorithm(str, Enum):
    popo = "popo"
    grpo = "grpo"  # the baseline, from the same trainer


class OldLogprobs(str, Enum):
    trainer = "trainer"  # a no-grad trainer forward at the start of the step
    rollout = "rollout"  # the engine's sampled-token log-probs


class RolloutCorrection(str, Enum):
    none = "none"
    tis = "tis"  # truncated IS weight min(pi_old_trainer / pi_rollout, tis_cap) per token


@dataclass
class LossConfig:
    """Settings every objective shares."""

    # Tokens per chunk of the vocab-parallel log-prob / entropy: bounds the fp32
    # [tokens x vocab/TP] temporaries to this many rows.
    logprob_chunk_tokens: int = 1024
    # true: responses cut at the length limit carry no token into the loss (DAPO's overlong filtering).
    mask_truncated: bool = False
    # pi_old, the generating policy (POPO's weights, every importance ratio): a trainer forward before the
    # update, or the engine's sampled-token log-probs (saves the forward; their mismatch is logged).
    old_logprobs: OldLogprobs = OldLogprobs.trainer
    rollout_correction: RolloutCorrection = RolloutCorrection.none  # the engine's mismatch, corrected
    tis_cap: float = 2.0  # the TIS weight's cap


# --- POPO. The defaults are the authors' (momo1443/colm2026-POPO, configs/popo/default.yaml); the
# settings below "what this project adds" are off in them, each a documented extension.


class PopoWeights(str, Enum):
    softmax = "softmax"  # the paper: softmax over the group's positives of their mean log-prob / T_w
    uniform = "uniform"  # the paper's ablation: 1 / k for the group's k positives
    success_scaled = "success_scaled"  # ours: (1 - p) / k, p = k / G
    grpo_matched = "grpo_matched"  # ours: sqrt((1 - p) / p), GRPO's advantage of a positive


class PopoNormalizer(str, Enum):
    positive_tokens = "positive_tokens"  # the paper: N+, the response tokens of the rollouts with w > 0
    weighted_tokens = "weighted_tokens"  # ours: sum_i w_i |o_i| (the weights' overall scale cancels)
    all_tokens = "all_tokens"  # ours: every rollout's response tokens, negatives included (a token mean)


class SimilarityForm(str, Enum):
    pooled = "pooled"  # the paper: -cos(h(mean-pooled features), EMA target's pooled features + noise)
    per_token = "per_token"  # ours: 1 - cos(g(h_t), h_target_t) per positive token


class PerTokenPredictor(str, Enum):
    identity = "identity"
    linear = "linear"  # a trainable h x h head on the online side, identity at start


class ISBoundMode(str, Enum):
    none = "none"  # the paper: the weighted NLL, -w log pi (on-policy: no ratio)
    clip = "clip"  # ours: -w min(rho, 1 + eps_high), PPO's clip for a positive advantage
    truncate = "truncate"  # ours: -w stopgrad(min(rho, truncate_c)) log pi


class MomentumSchedule(str, Enum):
    constant = "constant"  # the paper: a fixed tau
    cosine = "cosine"  # BYOL: from tau up to 1 over the run
    adaptive = "adaptive"  # ours: negative feedback on a = 1 - m that holds the drift near d_target


class TwinDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


# DAPO's clip-higher bound: POPO's IS clip and GRPO's upper clip use the same default.
CLIP_HIGH = 0.28


@dataclass
class PredictorConfig:
    """h_phi of the pooled similarity: [Linear -> LayerNorm -> ReLU] x (layers - 1) -> Linear, hidden_size in
    and out, Xavier-uniform weights and zero biases at init, trained with the policy (its optimiser settings,
    LR schedule and gradient clip)."""

    hidden: int = 1024  # the hidden layers' width
    layers: int = 2  # the number of Linear layers (at least 2)
    noise_std: float = 0.02  # Gaussian noise added to the EMA target's features (the loss only)
    lr: Optional[float] = None  # null: the policy's learning rate (the paper)


@dataclass
class AdaptiveMomentumConfig:
    """schedule=adaptive (ours): log a <- log a + clamp(kappa (d / d_target - 1), -max_log_step, max_log_step)
    on the target's step size a = 1 - m, a in [1 - m_max, 1 - m_min]; d is the update's measured drift
    (popo_megatron.algo.drift)."""

    # The drift the law holds: small enough that the target is a close anchor, large enough that it is not
    # the online policy itself.
    d_target: float = 0.02
    # Gain of the feedback: a relative drift error of 100% changes a by ~10% per step. The lag responds
    # to a within a few steps (d ~ c / a), so a small gain keeps the loop stable and the noise averaged.
    kappa: float = 0.1
    # The largest change of log a in one step (exp(0.2) = 1.22x): one outlying drift cannot jerk the target.
    max_log_step: float = 0.2
    # Bounds: m_min = 0.9 keeps the target at least a 10-step average; m_max = 0.9999 a 10^4-step one.
    m_min: float = 0.9
    m_max: float = 0.9999  # the momentum's upper bound


@dataclass
class TargetConfig:
    """The EMA target xi <- m xi + (1 - m) theta after every optimiser step (the paper: m = tau, fixed). It
    exists when the similarity term is on (alpha > 0, or the adaptive alpha)."""

    tau: float = 0.995  # the momentum (constant), the start (cosine, adaptive)
    dtype: TwinDtype = TwinDtype.float32  # the target's dtype (bf16 halves its memory; the EMA blends in fp32)
    # Keep the target in host memory (pinned on CUDA); it visits the device in pieces.
    cpu_offload: bool = False
    # Log the k3 KL between the target and the policy every this many steps (monitoring only; 0: never).
    kl_every: int = 10
    # The momentum's schedule: constant (the paper), cosine (BYOL), adaptive (ours).
    schedule: MomentumSchedule = MomentumSchedule.constant
    adaptive: AdaptiveMomentumConfig = field(default_factory=AdaptiveMomentumConfig)


@dataclass
class ISBoundConfig:
    mode: ISBoundMode = ISBoundMode.none  # the policy term: the weighted NLL (the paper) or a bounded ratio (ours)
    eps_high: float = CLIP_HIGH  # clip: the ratio's upper bound 1 + eps_high
    truncate_c: float = 2.0  # truncate: the ratio's cap


@dataclass
class PerTokenConfig:
    """similarity=per_token (ours)."""

    predictor: PerTokenPredictor = PerTokenPredictor.identity  # the head on the online side
    # Adam's learning rate of the linear predictor (it follows the policy's LR schedule and is clipped with
    # its gradients). The head starts at the identity: at the policy's rate (1e-6) it would stay there.
    predictor_lr: float = 1.0e-4


@dataclass
class AdaptiveAlphaConfig:
    """Ours: PPO's adaptive-KL controller on the similarity weight, towards popo.target.adaptive.d_target:
    alpha <- clamp(alpha exp(clamp(kappa (d / d_target - 1), -max_log_step, max_log_step)), alpha_min,
    alpha_max)."""

    enabled: bool = False  # adapt alpha towards the drift target
    kappa: float = 0.1  # the same gain as the target law's, for the same reason
    max_log_step: float = 0.2  # PPO clips the controller's error to +-0.2 per update
    alpha_min: float = 1.0e-3  # > 0: a multiplicative law cannot leave 0
    alpha_max: float = 1.0  # the strongest pull to the target the controller may reach


@dataclass
class PopoConfig:
    """POPO: L = L_NLL + alpha L_sim + beta_ent L_ent over each group's positives (docs/algorithm.md)."""

    # --- the paper's POPO (the authors' defaults)
    weights: PopoWeights = PopoWeights.softmax  # w_i over each group's positives
    weight_temperature: float = 1.0  # T_w of the softmax weights
    length_normalize: bool = False  # w_i / |o_i|, renormalised over the group's positives
    reward_threshold: float = 0.0  # tau_r: a rollout is positive when its reward is above it
    alpha: float = 0.1  # the similarity term's weight (0: no similarity term and no EMA target)
    beta_ent: float = 0.01  # the entropy bonus over every completion (0: negatives are not forwarded)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    low_entropy_warning: float = 0.5  # a console warning when the step's mean entropy falls below it (0: off)
    # --- what this project adds
    normalizer: PopoNormalizer = PopoNormalizer.positive_tokens  # what the policy term is divided by
    is_bound: ISBoundConfig = field(default_factory=ISBoundConfig)
    similarity: SimilarityForm = SimilarityForm.pooled  # the form of the similarity term
    per_token: PerTokenConfig = field(default_factory=PerTokenConfig)
    adaptive_alpha: AdaptiveAlphaConfig = field(default_factory=AdaptiveAlphaConfig)


class AdvantageStd(str, Enum):
    population = "population"  # std with divisor G (DAPO-style, and what grpo_matched is derived from)
    sample = "sample"  # std with divisor G - 1 (the original GRPO, TRL)
    none = "none"  # r - mean(r), unscaled (Dr. GRPO)


class GrpoAggregation(str, Enum):
    token_mean = "token_mean"  # sum over every response token / their number (DAPO)
    sequence_mean = "sequence_mean"  # each response's token mean, then the mean over responses (TRL's "grpo")


@dataclass
class GrpoConfig:
    """The defaults are the DAPO-style GRPO: clip-higher, no KL, population std, token mean. The original
    GRPO: eps_high=0.2, kl_beta=0.04, advantage_std=sample (examples/tiny_cpu_grpo_vanilla.yaml). The POPO
    authors' baseline (TRL, loss_type grpo): eps_high=0.2, kl_beta=0.01, advantage_std=sample,
    aggregation=sequence_mean (examples/tiny_cpu_grpo_trl.yaml)."""

    eps_low: float = 0.2  # the ratio's lower clip 1 - eps_low
    eps_high: float = CLIP_HIGH  # DAPO's clip-higher, the same bound POPO's clip uses
    kl_beta: float = 0.0  # > 0: k3 KL to the frozen initial policy (a reference forward per step)
    advantage_std: AdvantageStd = AdvantageStd.population  # advantages (r - mean) / (std + eps)
    aggregation: GrpoAggregation = GrpoAggregation.token_mean  # how the per-token losses become the loss


class LRDecayStyle(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass
class OptimConfig:
    lr: float = 1e-6  # the peak learning rate (AdamW)
    weight_decay: float = 0.01  # decoupled weight decay
    adam_beta1: float = 0.9  # Adam's first-moment decay
    adam_beta2: float = 0.999  # Adam's second-moment decay
    adam_eps: float = 1e-8  # Adam's epsilon
    clip_grad: float = 1.0  # global gradient-norm clip; 0 switches it off
    lr_warmup_steps: int = 0  # optimiser steps of linear warm-up
    lr_decay_style: LRDecayStyle = LRDecayStyle.constant  # over the run's optimiser steps, down to min_lr
    min_lr: float = 0.0  # the rate the decay ends at
    # ZeRO-1: optimiser state (and the twin) sliced across data-parallel ranks.
    use_distributed_optimizer: bool = True
    # Parameters per gradient-reduction bucket (Megatron DDP); None: one bucket per dtype.
    ddp_bucket_size: Optional[int] = None


class OnMalformed(str, Enum):
    error = "error"  # stop with the file and line of the first bad row
    skip = "skip"  # skip bad rows, count them by reason and report them


@dataclass
class SyntheticConfig:
    """The arithmetic task (popo_megatron.data.synthetic): every problem of the operand range, split into
    `synthetic` (train) and `synthetic:heldout`; its difficulty is the operand range and count."""

    min_operand: int = 0  # the smallest operand
    max_operand: int = 19  # operands 0..19: 400 problems (330 train, 70 held out)
    operands: int = 2  # operands per problem
    operations: str = "+"  # any of "+-*"
    size: int = 0  # at most this many problems per split (a fixed shuffled order); 0: all
    seed: int = 0  # that order


@dataclass
class DataConfig:
    # A bundled set (synthetic, math_train_slice, math500) or a .jsonl / .parquet file.
    train: str = "synthetic"
    # Field names; None: the first present of problem/question, answer, solution (answer in its \boxed{}).
    problem_key: Optional[str] = None  # the problem's field
    answer_key: Optional[str] = None  # the answer's field
    solution_key: Optional[str] = None  # the solution's field (its last \boxed{} is the answer)
    on_malformed: OnMalformed = OnMalformed.error  # what a malformed data row does
    # "{problem}" is replaced by the problem; None: the tokenizer's chat template (with `instruction`),
    # or the bare problem when the tokenizer has none.
    prompt_template: Optional[str] = None
    # The user message's instruction after the problem (chat template).
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    shuffle_seed: int = 0  # the prompt order: reshuffled each epoch from (this, epoch)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # DAPO's dynamic sampling: drop groups without a learning signal (POPO: no positive; GRPO: all
    # rewards equal) and sample more prompts until the step has prompts_per_step groups, at most
    # dynamic_sampling_max_rounds generation rounds.
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4  # at most this many generation rounds per step


@dataclass
class RolloutConfig:
    n: int = 8  # responses per prompt: the group size G
    temperature: float = 1.0  # the sampling temperature (the loss divides the logits by it too)
    # Truncated sampling. The engine's log-probs are then renormalised over the kept tokens, the trainer's
    # are not: a config that puts rollout log-probs into a ratio with them is rejected (config/validate.py).
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 1024  # the response length limit
    # The engine's context (prompt + response); None: the model's max_position_embeddings.
    max_model_len: Optional[int] = None
    tensor_parallel_size: int = 1  # vLLM's TP group, inside the torchrun world
    gpu_memory_utilization: float = 0.5  # GPU: fraction of device memory for the engine's weights and KV cache
    kv_cache_memory_mb: int = 256  # CPU: the KV cache (vLLM would otherwise size it from all RAM)
    cpu_threads: Optional[int] = None  # CPU: OpenMP threads of the engine (set before it starts)
    # The scheduler's limits per engine step (None: vLLM's defaults; on CPU 256 sequences and 4096 tokens).
    # Higher limits run a step's rollouts in fewer engine steps; the KV cache must hold max_num_seqs
    # sequences for the limit to take effect.
    max_num_seqs: Optional[int] = None  # sequences per engine step
    max_num_batched_tokens: Optional[int] = None  # tokens per engine step
    enforce_eager: bool = False  # GPU: no CUDA graphs (CPU engines are always eager)
    sleep_level: int = 1  # GPU: 1 offloads weights and drops the KV cache while training; 2 drops both
    seed: int = 0  # the engine's seed (each prompt is sampled with its own seed from the run's)


@dataclass
class RewardConfig:
    workers: int = 2  # grading processes
    # Per response, all of its grading (math-verify's parses and comparison share it): a worker that overruns
    # is killed and the response scores 0 (`timeout`).
    timeout_s: float = 5.0
    # Each grading worker's memory (its data segment, RLIMIT_DATA): an answer that makes sympy allocate
    # without bound ends that worker (`worker_crash`, the response scores 0), not the machine.
    worker_memory_mb: int = 4096
    # Tried in order when a response has no \boxed{}: answer_is, last_math, last_number.
    answer_fallbacks: list[str] = field(default_factory=list)
    # A problem whose gold answer is a literal number accepts only a literal number (432, 432.0, 1,234; a
    # fraction in lowest terms where the gold is one): an expression such as `24 \times 18` is graded
    # `not_literal` (popo_megatron.reward.literal). null: on when data.train is a generated arithmetic set
    # (synthetic, arithmetic_words), whose answers a model could otherwise earn by restating the problem;
    # off for files and the bundled math sets, which keep math-verify's symbolic equivalence.
    require_literal: Optional[bool] = None


@dataclass
class TrainConfig:
    output_dir: str = "outputs/popo"  # where the run writes everything (docs/training.md: the run directory)
    steps: int = 50  # rollout steps
    prompts_per_step: int = 16  # prompts per step over all ranks; each gets rollout.n responses
    mini_batches: int = 1  # optimiser steps per rollout step
    micro_batch_size: int = 8  # rows per micro-batch on each data-parallel rank (fewer when fewer rows train)
    # Pack whole sequences end to end into micro-batches of at most this many tokens instead (micro_batch_size
    # is then unused): no padding between rows, memory set by the budget, not the longest row. A sequence
    # (prompt + response) longer than the budget is an error. None: padded rows. docs/training.md: packing.
    max_tokens_per_microbatch: Optional[int] = None
    checkpoint_every: int = 0  # steps; 0: only at the end, on SIGTERM / SIGUSR1 and by checkpoint_every_minutes
    # Also checkpoint once this many minutes have passed since the last save (or the start), so that a crash
    # loses at most that much; None: by steps only.
    checkpoint_every_minutes: Optional[float] = 30.0
    keep_last: int = 2  # checkpoints kept in output_dir
    resume: bool = True  # continue from output_dir/latest when there is one
    # Start from this training checkpoint instead (e.g. another run's, at another layout); wins over `resume`.
    resume_from: Optional[str] = None
    # Weight sync to the engine: the MB gathered per bucket. On CPU, memory of 2 buckets in /dev/shm per host
    # and up to 3 per rank stays held between syncs (the fastest measured: bench/bench_conversion.py).
    weight_sync_bucket_mb: int = 256
    # Write every response of every step (and of each held-out evaluation) to OUTPUT_DIR/rollouts/*.jsonl:
    # prompt, response, reward, grade reason, extracted answer, POPO weight or GRPO advantage.
    save_rollouts: bool = False
    # Stop with a checkpoint once the next step might end later than this many seconds after start
    # (slurm/train.sbatch sets it from the job's time limit); None: no limit.
    max_wall_time_s: Optional[float] = None
    # An update whose gradient norm is NaN or inf is refused (weights, optimiser state and LR schedule kept,
    # counted as train/nonfinite_steps); after this many in a row the run stops, naming the last checkpoint.
    max_nonfinite_steps: int = 3


@dataclass
class EvalConfig:
    """Held-out evaluation during training, on the live engine: before the first step, every `every` steps
    and after the last (OUTPUT_DIR/eval.jsonl, TensorBoard eval/*, the learning curve and the summary)."""

    data: Optional[str] = None  # a dataset name (e.g. synthetic:heldout) or file; None: no evaluation
    every: int = 0  # steps between evaluations; 0: only at the start and the end
    k: int = 4  # samples per problem (avg@k, pass@k), with the rollout's sampling settings except:
    # the sampling temperature of the evaluation; None: the rollout's. Below 1 it measures what the policy
    # knows rather than the spread it explores with (R1-style reports use 0.6; verl validates greedily).
    temperature: Optional[float] = None
    seed: int = 0  # the same samples' seeds at every evaluation: differences are the policy's


@dataclass
class RunConfig:
    """Everything `popo train` reads: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # The objective: popo (docs/algorithm.md) or grpo, the baseline, from the same trainer.
    algorithm: Algorithm = Algorithm.popo
    popo: PopoConfig = field(default_factory=PopoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1234  # the run's random streams: rollout seeds, a generated model, the predictor's init, the noise
