"""The MoR language model: megatron-core's ``GPTModel`` with :class:`MoRBlock` as its decoder.

GPTModel hard-codes ``TransformerBlock`` as its decoder, so the model is built with an empty block and the
decoder is then replaced (megatron-core-notes section 1, option 1). Embedding, RoPE, output layer, tied
embeddings, loss and ``set_input_tensor`` are GPTModel's own.
"""

from __future__ import annotations

import torch
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
                 pg_collection):
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
        )
        self.decoder = MoRBlock(config, block_spec, layout=layout, recursion=recursion, pre_process=pre_process,
                                post_process=post_process, pg_collection=self.pg_collection)

    def forward(self, input_ids: Tensor | None, position_ids: Tensor | None, attention_mask: Tensor | None,
                labels: Tensor | None = None, *, loss_mask: Tensor | None = None,
                routing_mode: RoutingMode = "topk", decoder_input: Tensor | None = None,
                recursion_chunk: int | None = None) -> Tensor:
        """Token ids ``[b, s]`` -> per-token loss ``[b, s]`` when ``labels`` are given, else logits ``[b, s, V/tp]``.

        ``routing_mode`` `causal` runs the threshold routing that serving uses; `topk` is training routing.
        ``position_ids`` ``[b, s]`` are the positions RoPE rotates at (packed documents may restart at 0);
        None means ``0..s-1``. ``attention_mask`` is None (causal) or ``[b, 1, s, s]`` bool, True = masked
        (document masking). With pipeline parallelism each call runs one recursion chunk (virtual stage) of this
        rank: the input comes from ``set_input_tensor`` except for chunk 0 on the first rank, and the output is
        the packed stage tensor except for the last chunk on the last rank.
        """
        if recursion_chunk is not None:
            return self._forward_chunk(input_ids, position_ids, attention_mask, labels, loss_mask, routing_mode,
                                       recursion_chunk)
        return super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               decoder_input=decoder_input, labels=labels, loss_mask=loss_mask,
                               extra_block_kwargs={"routing_mode": routing_mode, "position_ids": position_ids})

    def _forward_chunk(self, input_ids, position_ids, attention_mask, labels, loss_mask, routing_mode,
                       recursion_chunk: int) -> Tensor:
        is_first = self.pre_process and recursion_chunk == 0
        is_last = self.post_process and recursion_chunk == self.decoder.recursion.num_recursions - 1
        embedded = self.embedding(input_ids=input_ids, position_ids=position_ids) if is_first else None
        rotary_pos_emb = self.rotary_pos_emb(self.decoder.packing.seq_length)
        hidden = self.decoder(hidden_states=embedded, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                              routing_mode=routing_mode, recursion_chunk=recursion_chunk, position_ids=position_ids)
        if not is_last:
            return hidden
        return self._postprocess(hidden_states=hidden, input_ids=input_ids, position_ids=position_ids,
                                 labels=labels, rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=None,
                                 rotary_pos_sin=None, mtp_in_postprocess=False, loss_mask=loss_mask,
                                 attention_mask=attention_mask)

    def set_aux_loss_scale(self, scale: float) -> None:
        """Backward scale of router losses, normally ``1 / num_microbatches`` like megatron's LM loss."""
        self.decoder.aux_loss_scale = scale

    def pop_router_stats(self) -> dict[str, float]:
        """Router statistics (means over forwards since the last call), keyed ``router/<name>[/r<n>]``."""
        return self.decoder.router_stats.pop()

    @torch.no_grad()
    def token_depths(self, input_ids: Tensor, position_ids: Tensor, routing_mode: RoutingMode = "causal",
                     attention_mask: Tensor | None = None) -> Tensor:
        """``[b, s]`` int64: how many recursions of the shared block each token ran in one forward.

        Read from the routing's own decisions (:meth:`MoRBlock.recording_active_masks`), for any routing and KV
        mode: every recursion under routing `none`, the token's assigned depth + 1 under token-choice, the
        recursions that kept it under expert-choice (0 when the first recursion dropped it). One process
        without pipeline parallelism; like any forward, it adds to the router statistics.
        """
        if self.decoder.pp_size > 1:
            raise RuntimeError("token_depths runs the whole model in one process (no pipeline parallelism)")
        with self.decoder.recording_active_masks() as masks:
            self(input_ids, position_ids, attention_mask, routing_mode=routing_mode)
        return torch.stack(masks).sum(dim=0)

    def update_router_bias(self, rate: float, group=None) -> None:
        """Loss-free token-choice balancing step; call once after each optimizer step (no-op otherwise)."""
        if isinstance(self.decoder.router, TokenChoiceRouter) and self.decoder.router.balancing == "loss_free":
            self.decoder.router.update_bias(rate, group)
