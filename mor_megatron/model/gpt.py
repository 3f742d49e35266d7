"""The MoR language model: megatron-core's ``GPTModel`` with :class:`MoRBlock` as its decoder.

GPTModel hard-codes ``TransformerBlock`` as its decoder, so the model is built with an empty block and the
decoder is then replaced (megatron-core-notes section 1, option 1). Embedding, RoPE, output layer, tied
embeddings, loss and ``set_input_tensor`` are GPTModel's own.
"""

from __future__ import annotations

from torch import Tensor

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_megatron.config import LayerLayout, RecursionConfig
from mor_megatron.model.block import MoRBlock
from mor_megatron.model.routing import RoutingMode, TokenChoiceRouter


class MoRGPTModel(GPTModel):
    """GPTModel whose decoder applies a shared block recursively with MoR routing.

    Args:
        config: megatron TransformerConfig.
        block_spec: unique-layer specs + final norm (see :func:`mor_megatron.model.specs.mor_block_spec`).
        layout, recursion: the MoR structure.
        Remaining arguments are GPTModel's.
    """

    def __init__(self, config: TransformerConfig, *, block_spec: TransformerBlockSubmodules, layout: LayerLayout,
                 recursion: RecursionConfig, vocab_size: int, max_sequence_length: int, pre_process: bool,
                 post_process: bool, share_embeddings_and_output_weights: bool, rotary_base: float,
                 pg_collection, vp_stage: int | None = None):
        super().__init__(
            config=config,
            transformer_layer_spec=TransformerBlockSubmodules(layer_specs=[], layer_norm=None),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.decoder = MoRBlock(config, block_spec, layout=layout, recursion=recursion, pre_process=pre_process,
                                post_process=post_process, pg_collection=self.pg_collection, vp_stage=vp_stage)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None,
                labels: Tensor | None = None, *, loss_mask: Tensor | None = None,
                routing_mode: RoutingMode = "topk", decoder_input: Tensor | None = None) -> Tensor:
        """Token ids ``[b, s]`` -> per-token loss ``[b, s]`` when ``labels`` are given, else logits ``[b, s, V/tp]``.

        ``routing_mode`` `causal` runs the threshold routing that serving uses; `topk` is training routing.
        """
        return super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               decoder_input=decoder_input, labels=labels, loss_mask=loss_mask,
                               extra_block_kwargs={"routing_mode": routing_mode})

    def set_aux_loss_scale(self, scale: float) -> None:
        """Backward scale of router losses, normally ``1 / num_microbatches`` like megatron's LM loss."""
        self.decoder.aux_loss_scale = scale

    def pop_router_stats(self) -> dict[str, float]:
        """Router statistics (means over forwards since the last call), keyed ``router/<name>[/r<n>]``."""
        return self.decoder.router_stats.pop()

    def update_router_bias(self, rate: float, group=None) -> None:
        """Loss-free token-choice balancing step; call once after each optimizer step (no-op otherwise)."""
        if isinstance(self.decoder.router, TokenChoiceRouter) and self.decoder.router.balancing == "loss_free":
            self.decoder.router.update_bias(rate, group)
