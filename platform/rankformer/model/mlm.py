"""Masked-gene prediction that computes the vocabulary projection only where a gene is masked.

Hugging Face's ``BertForMaskedLM.forward`` projects every position onto the whole vocabulary
(cells x tokens x ~20,000 logits); only ~15% of positions carry a label, so :class:`MaskedGeneLM`
runs the encoder, gathers the labelled positions and applies the prediction head to those alone.
Same weights, same loss, ~7x less head work and memory.

Which positions are labelled is known on the host, where the masking is drawn
(:func:`labelled_positions`); the model takes their flat indices, so a training step on a GPU
never waits for the device to find them (a boolean mask on a device tensor does).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertForMaskedLM

from rankformer.model.masking import IGNORE


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the (batch x tokens) positions that carry a label, in row-major order;
    those labels)."""
    flat = labels.reshape(-1)
    where = (flat != IGNORE).nonzero().squeeze(1)
    return where, flat[where]


class MaskedGeneLM(torch.nn.Module):
    def __init__(self, mlm: BertForMaskedLM) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        where: torch.Tensor,
        target: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cells: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the labelled positions, their logits). ``attention_mask``: as BERT
        takes it (2-D, or from :func:`rankformer.model.device.attention_mask_on`); ``where``,
        ``target``: from :func:`labelled_positions`. A packed batch (:mod:`rankformer.model.packing`)
        gives its ``position_ids``, no mask and its ``cells`` (``Packed.attention_kwargs``): attention
        then stays within each cell."""
        hidden = self.mlm.bert(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **(cells or {})
        ).last_hidden_state
        logits = self.mlm.cls(hidden.flatten(0, 1).index_select(0, where))
        if target.numel() == 0:  # nothing masked in this batch: a zero loss that keeps the graph
            return logits.sum() * 0.0, logits
        return torch.nn.functional.cross_entropy(logits.float(), target), logits
