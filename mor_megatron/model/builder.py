"""Build a MoR model from the project's config: megatron TransformerConfig, specs, and :class:`MoRGPTModel`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from mor_megatron.config import ModelConfig, ParallelConfig, RecursionConfig, layer_layout
from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.model.recursion_state import PipelinePacking
from mor_megatron.model.specs import SpecProvider, default_provider, mor_block_spec


def virtual_pipeline_size(recursion: RecursionConfig, parallel: ParallelConfig) -> int | None:
    """Virtual pipeline stages per rank: one per recursion when a recursive model is pipelined, else None."""
    if parallel.pipeline_parallel_size > 1 and recursion.num_recursions > 1:
        return recursion.num_recursions
    return None


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
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(recursion, parallel),
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        apply_rope_fusion=False,
        # Batched p2p posts [send_prev, recv_prev, send_next, recv_next] on every rank; with two pipeline ranks
        # (prev == next) the interleaved schedule's concurrent activation and gradient messages then pair up
        # in the wrong order on transports that match messages by order (gloo). megatron's unbatched path
        # orders sends and receives by rank parity and is correct everywhere.
        batch_p2p_comm=False,
        # `full` is run by MoRBlock itself (per recursion); megatron's validation wants a method and chunk for it.
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )


def build_model(model: ModelConfig, recursion: RecursionConfig, config: TransformerConfig, *, pg_collection,
                provider: SpecProvider | None = None, pipeline_seq_length: int | None = None,
                recompute_recursions: tuple[int, ...] = ()) -> MoRGPTModel:
    """Instantiate this rank's part of the MoR model (for R = 1 and routing `none`, the vanilla Llama GPT).

    Without pipeline parallelism that is the whole model. With it, the rank holds its slice of the shared block
    (plus embedding and prefix on the first rank, suffix and output layer on the last) and runs one recursion
    per call; ``pipeline_seq_length`` (the training sequence length) fixes the stage-boundary tensor's shape.
    ``recompute_recursions`` (counted from 1; empty: all) limits ``config.recompute_granularity`` in the shared
    block to those recursions.
    """
    layout = layer_layout(model, recursion)
    block_spec = mor_block_spec(layout, provider or default_provider(model.transformer_impl),
                                core_attention=model.core_attention)
    pp_group = pg_collection.pp
    pp_rank, pp_size = get_pg_rank(pp_group), get_pg_size(pp_group)
    if pp_size > 1 and pipeline_seq_length is None:
        raise ValueError("a pipeline-parallel MoR model needs pipeline_seq_length (the training sequence length)")
    gpt = MoRGPTModel(
        config,
        block_spec=block_spec,
        layout=layout,
        recursion=recursion,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_seq_length,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=model.tie_embeddings,
        rotary_base=model.rotary_base,
        pg_collection=pg_collection,
    )
    gpt.decoder.recompute_recursions = frozenset(r - 1 for r in recompute_recursions) or None
    if pp_size > 1:
        # Under sequence parallelism megatron sends 1/tp of the boundary tensor's rows: they must divide.
        gpt.decoder.packing = PipelinePacking(seq_length=pipeline_seq_length, hidden_size=model.hidden_size,
                                              routing=recursion.routing,
                                              row_multiple=get_pg_size(pg_collection.tp) if config.sequence_parallel
                                              else 1)
    return gpt
