"""Hugging Face config -> Megatron-Core GPTModel (TransformerConfig + layer spec).

One function per step, so the trainer, the converters and the tests build the
model the same way. The layer spec is Transformer Engine's on CUDA (with the
FP8 settings of the config) and megatron-core's local torch modules otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from popo_megatron.config.schema import setting_value
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.model.layout import megatron_query_groups, padded_vocab_size
from popo_megatron.platform import resolve_layer_spec, transformer_config_device_kwargs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_transformer_config(args: HFModelArgs, model_cfg: DictConfig, parallel_cfg: DictConfig):
    """The TransformerConfig of `args` at the configured parallel layout."""
    from megatron.core.transformer import TransformerConfig

    tp = parallel_cfg.tensor_model_parallel_size
    pp = parallel_cfg.pipeline_model_parallel_size
    dtype = _DTYPES[setting_value(model_cfg.params_dtype)]
    spec = resolve_layer_spec(model_cfg.spec)
    fp8 = model_cfg.fp8
    fp8_kwargs = {}
    if fp8.enabled:
        fp8_kwargs = dict(
            fp8=setting_value(fp8.format),
            fp8_recipe=setting_value(fp8.recipe),
            fp8_margin=fp8.margin,
            fp8_amax_history_len=fp8.amax_history_len,
            fp8_amax_compute_algo=setting_value(fp8.amax_compute_algo),
            fp8_param=fp8.fp8_weights,
        )
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=megatron_query_groups(args.num_kv_heads, tp),
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        qk_layernorm=args.qk_norm,
        # RL fine-tuning of pretrained models: no dropout (as verl / NeMo-RL do), which
        # also keeps the forward deterministic for log-prob matching against vLLM.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_cfg.context_parallel_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Weights are loaded from the checkpoint; random init is wasted work (minutes at 32B).
        perform_initialization=False,
        **transformer_config_device_kwargs(spec),
        **fp8_kwargs,
    )


def make_layer_spec(args: HFModelArgs, model_cfg: DictConfig):
    spec = resolve_layer_spec(model_cfg.spec)
    from megatron.core.models.gpt import gpt_layer_specs

    if spec == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_norm)
    from popo_megatron.model.packed_attention import PackedDotProductAttention
    from popo_megatron.platform.megatron_compat import install_vectorized_thd_rope

    # megatron-core's unfused RoPE for packed sequences loops over them in Python; the same arithmetic at once.
    install_vectorized_thd_rope()
    local = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=args.qk_norm, normalization="RMSNorm")
    # Packed sequences (train.max_tokens_per_microbatch) attend within themselves, as with TE's THD.
    local.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return local


def build_gpt_model(args: HFModelArgs, cfg: DictConfig, parallel_output: bool = True):
    """Build this rank's GPTModel stage (uninitialised weights: load them with
    popo_megatron.weights.load_hf_weights). Parallel state must be initialised."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = cfg.parallel.tensor_model_parallel_size
    config = make_transformer_config(args, cfg.model, cfg.parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=make_layer_spec(args, cfg.model),
        vocab_size=padded_vocab_size(args.vocab_size, cfg.model.make_vocab_size_divisible_by, tp),
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=args.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(args.rope_theta),
        rope_scaling=args.llama3_rope_scaling_factor is not None,
        rope_scaling_factor=args.llama3_rope_scaling_factor or 8.0,
    )
    mark_tensor_parallel_weights(model)
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give every TP-split weight Megatron's `tensor_model_parallel` attributes.

    megatron-core sets them only inside its weight initialisers, which
    `perform_initialization=False` skips: the weights of the parallel linear
    layers and of the embedding would then count as TP duplicates, and the
    optimiser's gradient norm (and so clipping) would see one TP rank's shards
    only. Transformer Engine layers say how they are split in `parallel_mode`;
    weights already marked are left alone.
    """
    from megatron.core.tensor_parallel import layers

    split_dim = {layers.ColumnParallelLinear: 0, layers.VocabParallelEmbedding: 0, layers.RowParallelLinear: 1}
    te_split_dim = {"column": 0, "row": 1}
    for module in model.modules():
        dim = next((d for cls, d in split_dim.items() if isinstance(module, cls)), None)
        if dim is None:
            dim = te_split_dim.get(getattr(module, "parallel_mode", None))
        weight = getattr(module, "weight", None)
        if dim is not None and weight is not None and not getattr(weight, "tensor_model_parallel", False):
            layers.set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
