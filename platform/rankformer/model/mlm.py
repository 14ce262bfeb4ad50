"""Masked-gene prediction that computes the vocabulary projection only where a gene is masked.

Hugging Face's ``BertForMaskedLM.forward`` projects every position onto the whole vocabulary
(cells x tokens x ~20,000 logits); only ~15% of positions carry a label, so :class:`MaskedGeneLM`
runs the encoder, gathers the labelled positions and applies the prediction head to those alone.
Same weights, same loss, ~7x less head work and memory.
"""

from __future__ import annotations

import torch
from transformers import BertForMaskedLM

from rankformer.model.masking import IGNORE


class MaskedGeneLM(torch.nn.Module):
    def __init__(self, mlm: BertForMaskedLM) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over labelled positions, their logits, their labels)."""
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sel = labels != IGNORE
        logits = self.mlm.cls(hidden[sel])
        target = labels[sel]
        if target.numel() == 0:  # nothing masked in this batch: a zero loss that keeps the graph
            return logits.sum() * 0.0, logits, target
        return torch.nn.functional.cross_entropy(logits.float(), target), logits, target
