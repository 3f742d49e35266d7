"""The forward step hands the model what the data gives: the document mask only when the data has one."""

from __future__ import annotations

import torch

from mor_megatron.training.step import forward_step


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, tokens, position_ids, attention_mask, *, labels, routing_mode):
        self.calls.append((position_ids, attention_mask, routing_mode))
        return torch.zeros(tokens.shape)


def _batch(with_mask: bool) -> dict[str, torch.Tensor]:
    batch = {"tokens": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
             "loss_mask": torch.ones(2, 4), "position_ids": torch.tensor([[0, 1, 0, 1]] * 2)}
    if with_mask:
        batch["attention_mask"] = torch.ones(2, 1, 4, 4, dtype=torch.bool).triu(1)
    return batch


def test_forward_step_passes_the_document_mask_and_positions():
    model = _Recorder()
    for with_mask in (False, True):
        batch = _batch(with_mask)
        _, loss_fn = forward_step(iter([batch]), model, device=torch.device("cpu"), routing_mode="causal")
        positions, mask, mode = model.calls[-1]
        assert torch.equal(positions, batch["position_ids"]) and mode == "causal"
        assert (mask is None) if not with_mask else torch.equal(mask, batch["attention_mask"])
        loss, _ = loss_fn(torch.ones(2, 4))
        assert loss.item() == 1.0
