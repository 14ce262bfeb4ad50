"""Cells already in memory (an AnnData or a matrix) tokenized with the same kernel, checks and
schema as `rankformer tokenize`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from rankformer import schema
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.config.types import Layout
from rankformer.corpus.cells import Shard, inspect_source
from rankformer.corpus.tokenize import check_info, encode_source
from rankformer.io.memory import MEMORY_URI, MemorySource
from rankformer.vocab.gene_vocab import GeneVocab


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
    """Rank-value encode cells in memory into an Arrow table of the corpus schema, with the
    kernel, checks and schema of `rankformer tokenize`.

    Parameters
    ----------
    adata
        An AnnData (in memory or backed, ``backed="r"``: read by row chunks), or a CSR/dense
        cells x genes matrix with ``gene_ids``.
    vocab
        A :class:`GeneVocab` or the path of its JSON.
    layout
        ``"v2"`` (``<cls>`` genes ``<eos>``, 4,096 tokens at most) or ``"v1"`` (2,048, no
        special tokens).
    counts
        The raw counts: ``"X"``, ``"raw"`` or ``"layers/NAME"``.
    max_length
        Tokens per cell at most (default: the layout's).
    gene_ids
        One gene id (Ensembl or symbol) per column of a bare matrix.
    gene_id_column
        The var column of gene ids (``"index"``: the var names; absent default: an Ensembl var
        index, or scanpy's ``gene_ids``).
    carry
        obs columns to keep: a list, or a mapping obs name -> output name.
    coverage_floor
        Refuse input where less than this share of the counts maps to vocabulary genes.
    allow_normalized
        Accept non-integer counts (refused by default: rank value encoding needs raw counts).
    report
        Print the vocabulary coverage line, and how many cells were left out.

    Returns
    -------
    pyarrow.Table
        One row per kept cell, in input order: ``input_ids``, ``length``, ``cell_id``,
        ``source_file``, ``source_row`` (which input row) and the carried columns. Cells with no
        vocabulary gene, and cells whose obs ``filter_pass`` is 0, are left out;
        :func:`dropped_counts` says how many, and why.
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
    tables, dropped = [], {"no_vocabulary_gene": 0, "filter_pass": 0}
    for table, chunk, no_genes in encode_source(src, shard, cfg, voc):
        tables.append(table)
        dropped["no_vocabulary_gene"] += no_genes
        dropped["filter_pass"] += chunk.n_filtered
    out = pa.concat_tables(tables)
    if report and any(dropped.values()):
        print(f"{dropped_line(dropped, src.n_cells)}; source_row says which input row each kept cell is")
    meta = {**(out.schema.metadata or {}), DROPPED_KEY: json.dumps({"cells_in": src.n_cells, **dropped})}
    return out.replace_schema_metadata(meta)


DROPPED_KEY = b"rankformer.dropped"


def dropped_counts(table: pa.Table) -> dict[str, int]:
    """How many input cells :func:`tokenize_anndata` left out of ``table``, and why:
    ``cells_in``, ``no_vocabulary_gene`` (no gene of the vocabulary expressed) and ``filter_pass``
    (obs ``filter_pass`` is 0). Empty for a table that did not come from it."""
    raw = (table.schema.metadata or {}).get(DROPPED_KEY)
    return json.loads(raw) if raw else {}


def dropped_line(dropped: dict[str, int], cells_in: int) -> str:
    """``kept N of M cells (a without a vocabulary gene, b with filter_pass 0)``."""
    lost = dropped.get("no_vocabulary_gene", 0) + dropped.get("filter_pass", 0)
    return (
        f"kept {cells_in - lost:,} of {cells_in:,} cells ({dropped.get('no_vocabulary_gene', 0):,} without "
        f"a vocabulary gene, {dropped.get('filter_pass', 0):,} with obs filter_pass 0)"
    )
