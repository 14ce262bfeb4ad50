"""Example custom head: cell classification from the mean of the gene-token states.

Any class with Hugging Face's ``from_pretrained(model_dir, num_labels=...)`` and a
``forward(input_ids, attention_mask)`` returning logits (a tensor, or an output with ``.logits``)
can be a head; name it in a fine-tuning config as ``head_class: package.module:Class``::

    rankformer finetune cells ... --head-class rankformer.model.heads:MeanPoolForSequenceClassification

This one replaces BERT's pooler (a dense layer on the first token, which masked-gene pretraining
never trains) with the mean over the cell's gene tokens: the same vector the embeddings stage
calls the cell embedding. Special and pad tokens are left out of the mean; the lowest gene token
id comes from the config's ``first_gene_token`` (set by rankformer when it builds the head).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolForSequenceClassification(BertPreTrainedModel):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        drop = getattr(config, "classifier_dropout", None)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob if drop is None else drop)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        states = self.bert(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
        keep = (mask > 0) & (input_ids >= int(getattr(self.config, "first_gene_token", 0)))
        w = keep.to(states.dtype).unsqueeze(-1)
        pooled = (states * w).sum(1) / w.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
