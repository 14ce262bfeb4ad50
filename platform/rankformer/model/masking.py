"""Masked-gene modelling: which tokens to predict, and what the model sees in their place.

Pure torch on (batch, tokens) tensors. Of the gene tokens (never special or pad tokens) each is
chosen with probability ``prob``; of those 80% become ``<mask>``, 10% a random gene token, 10% stay
as they are. Labels hold the original token where chosen and -100 elsewhere.
"""

from __future__ import annotations

import torch

IGNORE = -100


def mask_genes(
    ids_bt: torch.Tensor,
    gene_lo: int,
    mask_id: int,
    n_tokens: int,
    generator: torch.Generator,
    prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels). Gene tokens are the ids ``>= gene_lo`` (specials come first in every
    rankformer vocabulary); random replacements are drawn from ``[gene_lo, n_tokens)``."""
    is_gene = ids_bt >= gene_lo
    u = torch.rand(ids_bt.shape, generator=generator, device=ids_bt.device)
    chosen = is_gene & (u < prob)
    labels = torch.where(chosen, ids_bt, torch.full_like(ids_bt, IGNORE))
    # one more draw splits the chosen tokens 80 / 10 / 10
    v = torch.rand(ids_bt.shape, generator=generator, device=ids_bt.device)
    to_mask = chosen & (v < 0.8)
    to_random = chosen & (v >= 0.8) & (v < 0.9)
    random_ids = torch.randint(gene_lo, n_tokens, ids_bt.shape, generator=generator, device=ids_bt.device)
    inputs = torch.where(to_mask, torch.full_like(ids_bt, mask_id), ids_bt)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels
