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

import itertools
from typing import Any

import torch
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolForSequenceClassification(BertPreTrainedModel):
    takes_packed_batches = True  # its forward pools each cell of a packed batch (gene_mean)

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
        pooled = gene_mean(self.bert, self.config, input_ids, attention_mask, **kwargs)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def gene_mean(
    bert: BertModel, config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
) -> torch.Tensor:
    """Each cell's mean last-layer state over its gene tokens (special and pad tokens left out).
    A packed batch (one row of cells end to end, :mod:`rankformer.model.packing`) is read by its
    cells' cumulative lengths (``cu_seq_lens_k`` on the device, else ``cu_seq_lens_q``)."""
    first_gene = int(getattr(config, "first_gene_token", 0))
    from rankformer.model.packing import cell_index, cumulative_lengths

    cu = cumulative_lengths(kwargs)
    if cu is not None and attention_mask is None:
        states = bert(input_ids=input_ids, **kwargs).last_hidden_state[0]
        cell = cell_index(cu.to(states.device), states.shape[0])
        w = (input_ids[0] >= first_gene).to(states.dtype).unsqueeze(-1)
        n = len(cu) - 1
        sums = states.new_zeros(n, states.shape[-1]).index_add_(0, cell, states * w)
        return sums / w.new_zeros(n, 1).index_add_(0, cell, w).clamp(min=1.0)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    states = bert(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
    keep = (mask > 0) & (input_ids >= first_gene)
    w = keep.to(states.dtype).unsqueeze(-1)
    return (states * w).sum(1) / w.sum(1).clamp(min=1.0)


class MultiTaskForSequenceClassification(BertPreTrainedModel):
    """One shared encoder, one classification head per task (`finetune cells --tasks`): the mean
    of the cell's gene-token states (as :class:`MeanPoolForSequenceClassification`), dropout, then
    a linear layer per task. The config names the tasks
    (``task_names``) and their class counts (``task_sizes``); the logits of all tasks come
    concatenated, (cells, sum of the class counts), task by task in that order
    (:func:`task_slices`). A cell without a task's label adds nothing to that task's loss (its
    label is -100)."""

    takes_packed_batches = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        sizes = [int(s) for s in getattr(config, "task_sizes", None) or [config.num_labels]]
        self.bert = BertModel(config, add_pooling_layer=False)
        drop = getattr(config, "classifier_dropout", None)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob if drop is None else drop)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(config.hidden_size, s) for s in sizes)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        pooled = self.dropout(gene_mean(self.bert, self.config, input_ids, attention_mask, **kwargs))
        logits = torch.cat([head(pooled) for head in self.heads], dim=-1)
        loss = None
        if labels is not None:
            loss = multitask_loss(logits, labels, task_slices(self.config))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def task_slices(config: Any) -> list[slice]:
    """Where each task's logits lie among a multi-task model's (one slice of all for one task)."""
    sizes = [int(s) for s in getattr(config, "task_sizes", None) or [config.num_labels]]
    bounds = [0, *itertools.accumulate(sizes)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def multitask_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    slices: list[slice],
    weights: list[float] | None = None,
    ignore: int = -100,
) -> torch.Tensor:
    """The weighted sum over tasks of each task's cross-entropy over the cells labelled for it
    (``labels``: (cells, tasks), ``ignore`` where a cell has no label); a task no cell of the batch
    is labelled for adds nothing."""
    total = logits.new_zeros(())
    for t, part in enumerate(slices):
        y = labels[:, t]
        if bool((y != ignore).any()):
            w = 1.0 if weights is None else float(weights[t])
            total = total + w * torch.nn.functional.cross_entropy(logits[:, part], y, ignore_index=ignore)
    return total
