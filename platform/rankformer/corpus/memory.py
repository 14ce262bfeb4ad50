"""Cells already in memory (an AnnData or a matrix) tokenized with the same kernel, checks and
schema as `rankformer tokenize`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rankformer import schema
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.config.types import Layout
from rankformer.corpus.cells import Shard, inspect_source
from rankformer.corpus.tokenize import check_info, encode_source
from rankformer.io.memory import MEMORY_URI, MemorySource
from rankformer.vocab.gene_vocab import GeneVocab

if TYPE_CHECKING:
    pass


def tokenize_anndata(
    adata: Any,
    vocab: GeneVocab | str,
    *,
    layout: Layout = "v2",
    counts: str = "X",
    max_length: int | None = None,
    gene_ids: Sequence[str] | None = None,
    gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN,
    carry: dict[str, str] | Sequence[str] | None = None,
    coverage_floor: float = 0.5,
    allow_normalized: bool = False,
    report: bool = True,
) -> pa.Table:
    """Rank-value encode cells in memory into an Arrow table of the corpus schema.

    ``adata``: an AnnData (counts from ``X``, ``raw`` or ``layers/NAME``; gene ids from
    ``var[gene_id_column]``, else an Ensembl var index), or a CSR/dense cells x genes matrix with
    ``gene_ids``. ``vocab``: a :class:`GeneVocab` or the path of its JSON. ``carry``: obs columns
    to keep (a list, or a mapping obs name -> output name). Rows come out in input order; cells
    with no vocabulary gene are dropped (``source_row`` says which input row each row is).
    ``report``: print the vocabulary coverage line.
    """
    voc = vocab if isinstance(vocab, GeneVocab) else GeneVocab.load(vocab)
    carried = dict(carry) if isinstance(carry, dict) else {c: c for c in (carry or [])}
    read = ReadOptions(gene_id_column=gene_id_column, counts=counts, allow_normalized=allow_normalized)
    cfg = TokenizeConfig(
        inputs=[MEMORY_URI],
        vocab=vocab if isinstance(vocab, str) else MEMORY_URI,
        out=MEMORY_URI,
        layout=layout,
        max_length=max_length,
        carry=carried,
        coverage_floor=coverage_floor,
        read=read,
    )
    src = MemorySource(adata, gene_id_column, counts, gene_ids)
    check_info(inspect_source(src, read), cfg, voc, report)
    shard = Shard(0, MEMORY_URI, 0, 0, src.n_cells)
    return pa.concat_tables([table for table, _, _ in encode_source(src, shard, cfg, voc)])
