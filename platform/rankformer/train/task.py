"""The masked-gene pretraining task: token layout, length-grouped batches of cells read from a
corpus (Ray Data or Arrow), the masked loss and accuracy, and the FLOPs a token costs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from rankformer import schema
from rankformer.config.train import PretrainConfig
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.model.batching import budget_batches, length_grouped, pad_batch
from rankformer.model.device import attention_mask_on, to_device
from rankformer.model.masking import mask_genes
from rankformer.model.mlm import labelled_positions
from rankformer.model.packing import pack_cells, packed_batches
from rankformer.train.loop import Stat
from rankformer.vocab.gene_vocab import GeneVocab

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclasses.dataclass
class TokenSpec:
    """What masking needs to know about the vocabulary."""

    pad: int
    mask: int
    gene_lo: int  # gene tokens are >= this (specials come first)
    n_tokens: int

    @classmethod
    def of(cls, vocab: GeneVocab) -> TokenSpec:
        gene_lo = vocab.gene_lo
        if max(vocab.specials.values()) >= gene_lo:
            raise InputError("vocabulary special tokens must precede the gene tokens")
        return cls(vocab.pad_id, vocab.specials[schema.MASK], gene_lo, vocab.n_tokens)


class MaskedGeneTask:
    """Length-grouped batches of cells; the masked-gene loss and accuracy on each."""

    def __init__(
        self, cells: Any, spec: TokenSpec, cfg: PretrainConfig, rank: int, packed: bool = False
    ) -> None:
        """``packed``: each micro-batch's cells in one token stream (:mod:`rankformer.model.packing`),
        batched by their tokens in all; else padded to the longest, grouped by length."""
        self.cells, self.spec, self.cfg, self.rank, self.packed = cells, spec, cfg, rank, packed
        self.gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)

    def epoch_batches(self, epoch: int) -> Iterator[list[np.ndarray]]:
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
        b = self.cfg.batch
        cut = packed_batches if self.packed else budget_batches
        if b.max_tokens is None:
            raise ValueError("the token budget is settled before training (train.budget)")  # a caller's bug
        return length_grouped(
            self.cells(epoch), b.max_tokens, b.max_cells, b.megabatch_cells, rng, batcher=cut
        )

    def forward(
        self, model: torch.nn.Module, batch: list[np.ndarray], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Stat]]:
        s = self.spec
        if self.packed:
            packed = pack_cells(batch)
            ids, attn, positions = packed.ids, None, to_device(packed.positions, device)
            cells = packed.attention_kwargs(device)
        else:
            ids, attn = pad_batch(batch, s.pad)
            positions, cells = None, None
        inputs, labels = mask_genes(ids, s.gene_lo, s.mask, s.n_tokens, self.gen, self.cfg.mask_prob)
        where, target = labelled_positions(labels)
        inputs_d, where_d, target_d = (to_device(t, device) for t in (inputs, where, target))
        mask = None if attn is None else attention_mask_on(attn, device)
        loss, logits = model(inputs_d, mask, where_d, target_d, positions, cells)
        real = int(ids.numel()) if attn is None else int(attn.sum())
        with torch.no_grad():
            correct = (logits.argmax(-1) == target_d).sum()  # on the device until the metrics are logged
        stats: dict[str, Stat] = {
            "tokens": float(real),
            "pad_tokens": float(ids.numel() - real),
            "correct": correct,
            "labels": float(target.numel()),
        }
        return loss, stats


def ray_cells(shard: Any, seed: int, rank: int) -> Any:
    """This worker's split of the corpus, one epoch per call, locally shuffled (seeded per epoch)."""

    def cells(epoch: int) -> Iterator[np.ndarray]:
        batches = shard.iter_batches(
            batch_size=256,
            batch_format="numpy",
            local_shuffle_buffer_size=1024,
            local_shuffle_seed=seed * 1_000 + epoch * 97 + rank,
        )
        for batch in batches:
            yield from batch[schema.INPUT_IDS]

    return cells


def arrow_cells(files: list[str], seed: int, rank: int = 0, world: int = 1) -> Any:
    """The same without Ray: files in a seeded order per epoch, every ``world``-th cell."""
    import pyarrow.parquet as pq

    def cells(epoch: int) -> Iterator[np.ndarray]:
        order = np.random.default_rng([seed, epoch]).permutation(len(files))
        i = 0
        for fi in order:
            with fs.open_input(files[fi]) as f:
                for rb in pq.ParquetFile(f).iter_batches(columns=[schema.INPUT_IDS]):
                    for ids in rb.column(0).to_numpy(zero_copy_only=False):
                        if i % world == rank:
                            yield np.asarray(ids)
                        i += 1

    return cells


def flops_per_token(model: torch.nn.Module, mean_length: float) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (12 x layers x hidden x length)."""
    c: Any = model.mlm.config  # type: ignore[union-attr]
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    n = sum(p.numel() for p in model.parameters()) - emb
    return float(6 * n + 12 * c.num_hidden_layers * c.hidden_size * mean_length)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    if os.environ.get("RANKFORMER_PEAK_FLOPS"):
        return float(os.environ["RANKFORMER_PEAK_FLOPS"])
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
