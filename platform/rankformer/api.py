"""The Python API for notebooks and the later stages: tokenize cells already in memory, and read a
finished corpus. The same kernel, checks and schema as `rankformer tokenize`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rankformer import schema
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.corpus.cells import Shard, inspect_source
from rankformer.corpus.tokenize import check_info, corpus_files, encode_source
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.io.memory import MEMORY_URI, MemorySource
from rankformer.vocab.gene_vocab import GeneVocab, load_expected

if TYPE_CHECKING:
    import pyarrow.dataset as pads
    import ray.data


def tokenize_anndata(
    adata: Any,
    vocab: GeneVocab | str,
    *,
    layout: str = "v2",
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


def read_corpus(
    out: str,
    *,
    engine: str = "ray",
    vocab_hash: str | None = None,
    columns: list[str] | None = None,
    read_cpus: float | None = None,
) -> ray.data.Dataset | pads.Dataset:
    """A finished corpus in manifest order: a Ray Dataset (``engine="ray"``; streams, shards over a
    cluster; its blocks follow the manifest, and iteration keeps that order when Ray Data's
    ``execution_options.preserve_order`` is on) or a ``pyarrow.dataset.Dataset``
    (``engine="arrow"``; no Ray). ``vocab_hash`` refuses a corpus made with another vocabulary;
    ``read_cpus`` is the CPU reservation of each read task (Ray Data's default: 1)."""
    files = corpus_files(out, vocab_hash=vocab_hash)
    filesystem = arrow_filesystem(out)
    paths = [_path_in(f, filesystem) for f in files]
    if engine == "arrow":
        import pyarrow.dataset as pads

        return pads.dataset(paths, format="parquet", filesystem=filesystem)
    if engine != "ray":
        raise InputError(f"engine {engine!r} must be 'ray' or 'arrow'")
    import ray.data

    ds = ray.data.read_parquet(paths, filesystem=filesystem, shuffle=None, num_cpus=read_cpus)
    # Ray Data pushes the projection into the read (its optimised plan has no Project operator, so
    # no second operator asks for a CPU that a cluster busy with training may not have on any node);
    # `columns=` on the read itself is deprecated
    return ds if columns is None else ds.select_columns(columns)


def corpus_manifest(out: str) -> dict[str, Any]:
    corpus_files(out)  # the error that says the corpus is unfinished
    return dict(fs.read_json(fs.join(out, schema.CORPUS_MANIFEST), "rerun `rankformer tokenize`"))


def corpus_vocab(out: str, manifest: dict[str, Any] | None = None) -> GeneVocab:
    """The vocabulary corpus ``out`` was tokenized with: the copy in its folder, else (a corpus
    made before the copy was kept) the file its config names; checked against its manifest."""
    manifest = manifest or corpus_manifest(out)
    uri = fs.join(out, schema.CORPUS_VOCAB)
    if not fs.exists(uri):
        uri = str(manifest["config"]["vocab"])
        if not fs.exists(uri):
            raise InputError(
                f"corpus {out} holds no {schema.CORPUS_VOCAB} and the vocabulary it was tokenized with, "
                f"{uri}, is not found from here; pass that vocabulary (--vocab) or tokenize again"
            )
    return load_expected(uri, manifest["vocab_hash"])


def arrow_filesystem(uri: str) -> pa.fs.FileSystem | None:
    """Local paths need none; s3:// goes through our fsspec filesystem (same endpoint settings)."""
    if not fs.is_remote(uri):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs.filesystem(uri)))


def _path_in(uri: str, filesystem: pa.fs.FileSystem | None) -> str:
    return uri.split("://", 1)[1] if filesystem is not None else uri
