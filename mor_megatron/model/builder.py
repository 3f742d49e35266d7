"""Build a MoR model from the project's config: megatron TransformerConfig, specs, and :class:`MoRGPTModel`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from mor_megatron.config import ModelConfig, ParallelConfig, RecursionConfig, layer_layout
from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.model.specs import SpecProvider, default_provider, mor_block_spec


def transformer_config(model: ModelConfig, recursion: RecursionConfig, parallel: ParallelConfig, *,
                       params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool = True,
                       recompute: str = "none") -> TransformerConfig:
    """megatron-core TransformerConfig for one Llama-style layer of ``model``.

    ``num_layers`` is the unrolled depth, which is what megatron's scaled output-projection init should see.
    RoPE fusion stays off: the fused kernels expect ``[s, 1, 1, d]`` frequencies, and MoR gathers per-token
    frequencies ``[k, b, 1, d]`` for the active tokens.
    """
    bf16 = params_dtype == torch.bfloat16
    return TransformerConfig(
        num_layers=layer_layout(model, recursion).num_unrolled_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        apply_rope_fusion=False,
        recompute_granularity="selective" if recompute == "selective" else None,
    )


def build_model(model: ModelConfig, recursion: RecursionConfig, config: TransformerConfig, *, pg_collection,
                provider: SpecProvider | None = None, pre_process: bool = True, post_process: bool = True,
                vp_stage: int | None = None) -> MoRGPTModel:
    """Instantiate the MoR model (or, for R = 1 and routing `none`, the vanilla Llama-style GPT)."""
    layout = layer_layout(model, recursion)
    block_spec = mor_block_spec(layout, provider or default_provider(model.transformer_impl))
    return MoRGPTModel(
        config,
        block_spec=block_spec,
        layout=layout,
        recursion=recursion,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        rotary_base=model.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
