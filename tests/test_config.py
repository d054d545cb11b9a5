"""Config loading and validation: every invalid case names its key and reason."""

from __future__ import annotations

import pytest
from tiny_models import QWEN2_CONFIG_JSON

from popo_megatron.config import ConfigError, load_config
from popo_megatron.config.validate import validate_config
from popo_megatron.model.hf_config import UnsupportedModelError, parse_hf_config

QWEN = QWEN2_CONFIG_JSON


def _cfg(*overrides):
    return load_config(overrides=["model.hf_path=/x", *overrides])


def _invalid(cfg, world_size=1, hf=QWEN, cuda=False, te=True):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, world_size, parse_hf_config(hf), cuda_available=cuda, te_installed=te)
    return str(err.value)


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hf_path: /ckpt\nparallel:\n  tensor_model_parallel_size: 2\n")
    cfg = load_config(path, ["parallel.pipeline_model_parallel_size=2", "seed=7"])
    assert (cfg.model.hf_path, cfg.parallel.tensor_model_parallel_size) == ("/ckpt", 2)
    assert (cfg.parallel.pipeline_model_parallel_size, cfg.seed) == (2, 7)
    validate_config(cfg, 4, parse_hf_config(QWEN))


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hf_path: /ckpt\nparallel:\n  tensor_parallel: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: parallel\.tensor_parallel: Key 'tensor_parallel' not in"):
        load_config(path)


def test_wrong_type_on_command_line_names_key():
    with pytest.raises(
        ConfigError,
        match=r"command line: 'parallel.tensor_model_parallel_size=two'.*"
        r"parallel\.tensor_model_parallel_size",
    ):
        _cfg("parallel.tensor_model_parallel_size=two")


def test_bad_enum_value_names_key():
    with pytest.raises(ConfigError, match=r"model\.params_dtype"):
        _cfg("model.params_dtype=float8")


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        _cfg("parallel.sequence_parallel")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml: not valid YAML.*line 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"required key\(s\) not set: model\.hf_path"):
        load_config()


@pytest.mark.parametrize(
    "overrides, world, hf, expected",
    [
        (
            ["parallel.tensor_model_parallel_size=3"],
            3,
            QWEN,
            r"tensor_model_parallel_size=3 does not divide the model's 4 attention heads",
        ),
        (
            ["parallel.tensor_model_parallel_size=4"],
            4,
            {**QWEN, "num_key_value_heads": 3, "num_attention_heads": 12, "hidden_size": 96},
            r"3 query groups \(KV heads\) can be neither split",
        ),
        (
            ["parallel.pipeline_model_parallel_size=3"],
            3,
            QWEN,
            r"pipeline_model_parallel_size=3 does not divide the model's 4 layers",
        ),
        (
            ["parallel.sequence_parallel=true"],
            1,
            QWEN,
            r"sequence_parallel=true needs parallel\.tensor_model_parallel_size > 1",
        ),
        (["parallel.tensor_model_parallel_size=2"], 3, QWEN, r"world size 3 is not divisible by .* = 2 x 1 x 1 = 2"),
        (
            ["parallel.context_parallel_size=2", "train.max_tokens_per_microbatch=64"],
            3,
            QWEN,
            r"world size 3 is not divisible by .*context_parallel_size = 1 x 1 x 2 = 2",
        ),
        (
            ["parallel.context_parallel_size=2"],
            2,
            QWEN,
            r"context_parallel_size=2 splits packed sequences: set train\.max_tokens_per_microbatch",
        ),
        (
            ["parallel.context_parallel_size=2", "train.max_tokens_per_microbatch=66"],
            2,
            QWEN,
            r"max_tokens_per_microbatch=66 must be a multiple of 2 x parallel\.context_parallel_size = 4",
        ),
        (["parallel.context_parallel_size=0"], 1, QWEN, r"parallel\.context_parallel_size=0: must be >= 1"),
        (["parallel.tensor_model_parallel_size=0"], 1, QWEN, r"parallel\.tensor_model_parallel_size=0: must be >= 1"),
        (["model.fp8.enabled=true"], 1, QWEN, r"model\.fp8\.enabled=true needs CUDA"),
        (["model.spec=te"], 1, QWEN, r"model\.spec=te needs CUDA"),
    ],
)
def test_invalid_layouts(overrides, world, hf, expected):
    import re

    assert re.search(expected, _invalid(_cfg(*overrides), world, hf))


@pytest.mark.parametrize("setting", ["model.fp8.enabled=true", "model.spec=te"])
def test_fp8_and_the_te_spec_need_transformer_engine_installed_on_gpu(setting):
    msg = _invalid(_cfg(setting), cuda=True, te=False)
    assert f"{setting} needs Transformer Engine, which is not installed here: install the gpu extra" in msg


def test_context_parallelism_on_gpu_needs_transformer_engines_attention():
    cp = ("parallel.context_parallel_size=2", "train.max_tokens_per_microbatch=64")
    for setting, te in (("model.spec=local", True), ("model.spec=auto", False)):
        msg = _invalid(_cfg(*cp, setting), 2, cuda=True, te=te)
        assert "context_parallel_size=2 on GPU needs Transformer Engine's attention" in msg
    validate_config(_cfg(*cp), 2, parse_hf_config(QWEN), cuda_available=True, te_installed=True)
    validate_config(_cfg(*cp), 2, parse_hf_config(QWEN), cuda_available=False)  # the CPU correctness path


def test_fp8_needs_te_spec_on_gpu():
    msg = _invalid(_cfg("model.fp8.enabled=true", "model.spec=local"), cuda=True)
    assert "needs the Transformer Engine layer spec" in msg


def test_all_problems_reported_together():
    msg = _invalid(_cfg("parallel.tensor_model_parallel_size=3", "parallel.pipeline_model_parallel_size=3"), 9)
    assert "attention heads" in msg and "layers" in msg


def test_fewer_kv_heads_than_tp_is_valid():
    validate_config(
        _cfg("parallel.tensor_model_parallel_size=4"), 4, parse_hf_config({**QWEN, "num_key_value_heads": 1})
    )


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(architectures=["MistralForCausalLM"]), r"architectures=\['MistralForCausalLM'\] is not supported"),
        (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
        (dict(use_sliding_window=True), r"use_sliding_window=true"),
        (dict(layer_types=["full_attention", "sliding_attention"]), r"only full attention"),
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), r"rope scaling of type 'yarn'"),
        (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4)), r"rope scaling of type 'llama3'"),
        ({"vocab_size": None}, r"missing key 'vocab_size'"),
    ],
)
def test_unsupported_models(change, expected):
    hf = {k: v for k, v in {**QWEN, **change}.items() if v is not None}
    with pytest.raises(UnsupportedModelError, match=expected):
        parse_hf_config(hf, where="ckpt/config.json")


def test_rope_theta_from_old_and_new_config_formats():
    assert parse_hf_config({**QWEN, "rope_theta": 1e6}).rope_theta == 1e6
    assert parse_hf_config({**QWEN, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}).rope_theta == 5e5


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["popo.is_bound.eps_high=0"], r"popo\.is_bound\.eps_high=0\.0: must be > 0"),
        (["popo.target.adaptive.m_min=0.99", "popo.target.adaptive.m_max=0.95"], r"m_min=0\.99: must be <= m_max"),
        (["popo.target.tau=1.5"], r"popo\.target\.tau=1\.5: must be in \[0, 1\]"),
        (["popo.alpha=-1"], r"popo\.alpha=-1\.0: must be >= 0"),
        (["popo.beta_ent=-0.1"], r"popo\.beta_ent=-0\.1: must be >= 0"),
        (["popo.weight_temperature=0"], r"popo\.weight_temperature=0\.0: must be > 0"),
        (["popo.predictor.layers=1"], r"popo\.predictor\.layers=1: must be >= 2"),
        (["popo.predictor.noise_std=-1"], r"popo\.predictor\.noise_std=-1\.0: must be >= 0"),
        (["popo.target.kl_every=-1"], r"popo\.target\.kl_every=-1: must be >= 0"),
        (["grpo.eps_low=1.2"], r"grpo\.eps_low=1\.2: must be in \(0, 1\)"),
        (["loss.logprob_chunk_tokens=0"], r"loss\.logprob_chunk_tokens=0: must be >= 1"),
        (["optim.ddp_bucket_size=0"], r"optim\.ddp_bucket_size=0: must be >= 1"),
        (["loss.rollout_correction=tis", "loss.old_logprobs=rollout"], r"needs loss\.old_logprobs=trainer"),
        (["popo.target.adaptive.d_target=0"], r"popo\.target\.adaptive\.d_target=0\.0: must be in \(0, 2\]"),
        (["popo.target.adaptive.max_log_step=0"], r"max_log_step=0\.0: must be > 0"),
        (["popo.adaptive_alpha.alpha_min=0"], r"adaptive_alpha\.alpha_min=0\.0: must be in \(0, alpha_max"),
        (["popo.per_token.predictor_lr=-1"], r"popo\.per_token\.predictor_lr=-1\.0: must be >= 0"),
        (["rollout.top_k=-1"], r"rollout\.top_k=-1: must be >= 0"),
        (["popo.alpha=0", "popo.target.schedule=adaptive"], r"no drift for the law to follow"),
        (["reward.workers=0"], r"reward\.workers=0: must be >= 1"),
        (["rollout.temperature=0"], r"rollout\.temperature=0\.0: must be > 0"),
        (["train.micro_batch_size=0"], r"train\.micro_batch_size=0: must be >= 1"),
        (["train.max_wall_time_s=-30"], r"train\.max_wall_time_s=-30\.0: must be > 0"),
        (["optim.min_lr=1.0"], r"optim\.min_lr=1\.0: must be in \[0, optim\.lr="),
        (["reward.answer_fallbacks=[last_word]"], r"reward\.answer_fallbacks: unknown \['last_word'\]"),
    ],
)
def test_invalid_algorithm_settings(overrides, expected):
    import re

    assert re.search(expected, _invalid(_cfg(*overrides)))


# Every config that feeds rollout log-probs into a ratio, with every kind of truncated sampling.
RATIO_USERS = [["loss.old_logprobs=rollout"], ["loss.rollout_correction=tis"]]
TRUNCATED = [["rollout.top_p=0.8"], ["rollout.top_k=20"]]


@pytest.mark.parametrize("user", RATIO_USERS, ids=["old_logprobs_rollout", "tis"])
@pytest.mark.parametrize("sampling", TRUNCATED, ids=["top_p", "top_k"])
def test_rollout_logprobs_in_a_ratio_with_truncated_sampling_are_rejected(user, sampling):
    message = _invalid(_cfg(*user, *sampling))
    assert f"{user[0]} with {sampling[0]}" in message, message
    assert "renormalised over the tokens truncated sampling keeps" in message
    validate_config(_cfg(*sampling), 1)  # truncated sampling with the trainer's old log-probs, no correction
    validate_config(_cfg(*user), 1)  # rollout log-probs in a ratio without truncation


def test_alpha_zero_is_the_no_target_ablation():
    validate_config(_cfg("popo.alpha=0"), 1)
    validate_config(_cfg("popo.alpha=0", "popo.adaptive_alpha.enabled=true", "popo.target.schedule=adaptive"), 1)
    validate_config(_cfg("popo.alpha=0", "popo.target.schedule=adaptive", "algorithm=grpo"), 1)


def test_algorithm_switches_parse():
    cfg = _cfg(
        "algorithm=grpo", "popo.weights=grpo_matched", "popo.target.schedule=cosine", "grpo.aggregation=sequence_mean"
    )
    assert (cfg.algorithm, cfg.popo.weights, cfg.popo.target.schedule, cfg.grpo.aggregation) == (
        "grpo",
        "grpo_matched",
        "cosine",
        "sequence_mean",
    )
    validate_config(cfg, 1, parse_hf_config(QWEN))
    with pytest.raises(ConfigError, match=r"popo\.is_bound\.mode"):
        _cfg("popo.is_bound.mode=soft")


def test_the_defaults_are_the_authors_popo():
    """configs/popo/default.yaml of momo1443/colm2026-POPO, and their trainer's: the paper's POPO."""
    popo = _cfg().popo
    assert (popo.weights, popo.weight_temperature, popo.length_normalize, popo.reward_threshold) == (
        "softmax",
        1.0,
        False,
        0.0,
    )
    assert (popo.alpha, popo.beta_ent, popo.target.tau, popo.target.schedule) == (0.1, 0.01, 0.995, "constant")
    assert (popo.predictor.hidden, popo.predictor.layers, popo.predictor.noise_std, popo.predictor.lr) == (
        1024,
        2,
        0.02,
        None,
    )
    assert (popo.target.kl_every, popo.low_entropy_warning) == (10, 0.5)
    assert (popo.normalizer, popo.is_bound.mode, popo.similarity) == ("positive_tokens", "none", "pooled")


def test_a_policy_copy_of_fp8_weights_is_refused():
    msg = _invalid(_cfg("model.fp8.enabled=true", "model.fp8.fp8_weights=true"), cuda=True)
    assert "a copy of the policy (its EMA or swap) needs high-precision parameters" in msg
    validate_config(
        _cfg("model.fp8.enabled=true", "model.fp8.fp8_weights=true", "popo.alpha=0"),
        1,
        parse_hf_config(QWEN),
        cuda_available=True,
        te_installed=True,
    )


def test_rollout_tp_must_divide_the_world():
    msg = _invalid(_cfg("rollout.tensor_parallel_size=4"), world_size=2)
    assert "rollout.tensor_parallel_size=4 does not divide the world size 2" in msg


@pytest.mark.parametrize("value", ["{problem}", "{problem}="])
def test_braces_on_the_command_line_get_a_quoting_hint(value):
    with pytest.raises(ConfigError, match=r"to pass text, quote it: data\.prompt_template='\"\{problem\}"):
        _cfg(f"data.prompt_template={value}")
    assert _cfg(f'data.prompt_template="{value}"').data.prompt_template == value


def test_plain_srun_tasks_get_torchrun_variables():
    from popo_megatron.platform.distributed import slurm_environment

    srun = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[07-09,12],cpu1",
    }
    assert slurm_environment(srun) == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(29500 + 3456),
    }
    assert (
        slurm_environment({**srun, "SLURM_STEP_NODELIST": "node1,node2", "MASTER_PORT": "7000"})["MASTER_ADDR"]
        == "node1"
    )
    assert slurm_environment({**srun, "RANK": "0"}) == {}, "torchrun under srun already set everything"
    assert slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}, "a single task is not a world"
