"""Hugging Face configuration of an exported Mixture-of-Recursions (MoR) model.

This file is copied into every exported MoR folder and loaded with ``trust_remote_code=True``; it imports
only ``transformers``. Field names follow ``LlamaConfig`` where the meaning is the same; the MoR fields say
how the unique layers are shared and routed (they mirror ``mor_megatron.config.RecursionConfig``):

* the model holds ``num_prefix_layers + num_shared_layers + num_suffix_layers`` unique Llama layers;
* the prefix layers run once, then the shared block runs ``num_recursions`` times, then the suffix layers;
* ``routing`` decides which tokens take part in each recursion (`none`, `expert_choice`, `token_choice`);
* ``kv_mode`` `recursion_wise` caches K/V per recursion for the tokens that reach it, `shared` reuses the
  K/V of the first recursion at every later one.
"""

from __future__ import annotations

from transformers import PretrainedConfig

SHARINGS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTINGS = ("none", "expert_choice", "token_choice")
KV_MODES = ("recursion_wise", "shared")
TOKEN_BALANCINGS = ("loss", "loss_free")


class MoRConfig(PretrainedConfig):
    """Configuration of :class:`MoRForCausalLM` (see the module docstring for the MoR fields).

    ``num_hidden_layers`` is the unrolled depth ``prefix + shared * recursions + suffix``; it is derived and
    checked, never chosen freely. ``capacities`` (expert-choice) default to ``(R - r) / R`` for 0-based
    recursion ``r``; they matter only for the training-style top-k routing (``routing_mode="topk"``), since
    causal routing keeps a candidate iff its router logit is >= 0, except at recursions of capacity 1.0,
    which keep every candidate.
    """

    model_type = "mor"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 3

    num_prefix_layers: int = 1
    num_shared_layers: int = 1
    num_suffix_layers: int = 1
    num_recursions: int = 1
    num_hidden_layers: int | None = None
    sharing: str = "middle_cycle"
    routing: str = "none"
    kv_mode: str = "recursion_wise"
    capacities: list[float] | None = None
    router_alpha: float = 0.1
    router_temperature: float = 1.0
    token_balancing: str = "loss"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        unrolled = (self.num_prefix_layers + self.num_shared_layers * self.num_recursions
                    + self.num_suffix_layers)
        if self.num_hidden_layers is None:
            self.num_hidden_layers = unrolled
        if self.capacities is None and self.routing == "expert_choice":
            total = self.num_recursions
            self.capacities = [(total - r) / total for r in range(total)]
        if self.capacities is not None:
            self.capacities = [float(c) for c in self.capacities]
        self._check(unrolled)
        super().__post_init__(**kwargs)

    def _check(self, unrolled: int) -> None:
        for name, value, allowed in (("sharing", self.sharing, SHARINGS), ("routing", self.routing, ROUTINGS),
                                     ("kv_mode", self.kv_mode, KV_MODES),
                                     ("token_balancing", self.token_balancing, TOKEN_BALANCINGS)):
            if value not in allowed:
                raise ValueError(f"MoRConfig.{name}={value!r} is not one of {list(allowed)}")
        if self.hidden_act != "silu":
            raise ValueError(f"MoRConfig.hidden_act={self.hidden_act!r}: MoR models use SwiGLU, 'silu'")
        if self.num_hidden_layers != unrolled:
            raise ValueError(
                f"MoRConfig.num_hidden_layers={self.num_hidden_layers} does not match num_prefix_layers="
                f"{self.num_prefix_layers} + num_shared_layers={self.num_shared_layers} x num_recursions="
                f"{self.num_recursions} + num_suffix_layers={self.num_suffix_layers} = {unrolled}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"MoRConfig.num_attention_heads={self.num_attention_heads} must be a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        cycled = self.sharing in ("cycle", "middle_cycle")
        if self.routing != "none" and not cycled:
            raise ValueError(f"MoRConfig.routing={self.routing!r} needs sharing 'cycle' or 'middle_cycle', "
                             f"got {self.sharing!r}")
        if self.kv_mode == "shared" and (not cycled or self.num_recursions < 2):
            raise ValueError("MoRConfig.kv_mode='shared' needs sharing 'cycle' or 'middle_cycle' and "
                             f"num_recursions > 1, got {self.sharing!r} and {self.num_recursions}")
        if self.routing == "expert_choice":
            caps = self.capacities
            if len(caps) != self.num_recursions or any(not 0.0 < c <= 1.0 for c in caps):
                raise ValueError(f"MoRConfig.capacities={caps} must hold num_recursions="
                                 f"{self.num_recursions} values in (0, 1]")
            if self.kv_mode == "shared" and caps[0] != 1.0:
                raise ValueError("MoRConfig.kv_mode='shared' records K/V of every token at the first "
                                 f"recursion, so capacities[0] must be 1.0, got {caps[0]}")

    def recursion_layers(self, recursion_idx: int) -> list[int]:
        """Unique-layer indices applied, in order, at 0-based recursion ``recursion_idx``.

        Cycle sharing runs the whole shared block per recursion; sequence sharing repeats each shared layer
        ``num_recursions`` times in a row, and recursion r is the r-th run of ``num_shared_layers`` unrolled
        positions (``mor_megatron.config.LayerLayout.recursion_layers``).
        """
        base, width = self.num_prefix_layers, self.num_shared_layers
        if self.sharing in ("cycle", "middle_cycle"):
            return list(range(base, base + width))
        unrolled = [base + i // self.num_recursions for i in range(width * self.num_recursions)]
        return unrolled[recursion_idx * width:(recursion_idx + 1) * width]

    @property
    def num_unique_layers(self) -> int:
        """Unique layers held by the model (prefix + shared block + suffix)."""
        return self.num_prefix_layers + self.num_shared_layers + self.num_suffix_layers


__all__ = ["MoRConfig"]
