"""A finished corpus as the later stages read it: its manifest, its shard files in order, its
vocabulary, and the cells as a Ray or Arrow dataset."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.vocab.gene_vocab import GeneVocab, load_expected

if TYPE_CHECKING:
    import pyarrow.dataset as pads
    import ray.data


def read_corpus(
    out: str,
    *,
    engine: str = "ray",
    vocab_hash: str | None = None,
    columns: list[str] | None = None,
    read_cpus: float | None = None,
) -> ray.data.Dataset | pads.Dataset:
    """A finished corpus, in manifest order.

    Parameters
    ----------
    out
        The corpus folder `rankformer tokenize` wrote (local or ``s3://``).
    engine
        ``"ray"``: a Ray Dataset (streams, shards over a cluster; its blocks follow the manifest,
        and iteration keeps that order when Ray Data's ``execution_options.preserve_order`` is
        on). ``"arrow"``: a ``pyarrow.dataset.Dataset``, no Ray.
    vocab_hash
        Refuse a corpus made with another vocabulary (a model's ``vocab_hash``).
    columns
        The columns to read (default: all).
    read_cpus
        The CPU reservation of each read task (Ray Data's default: 1).

    Returns
    -------
    ray.data.Dataset or pyarrow.dataset.Dataset
        One row per cell: ``input_ids``, ``length``, ``cell_id``, ``source_file``,
        ``source_row`` and the carried obs columns.
    """
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
    """A finished corpus's ``manifest.json``: its shards, cell and token counts, what was dropped
    and why, the tokenize config and the vocabulary hash (an error names an unfinished corpus)."""
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


def read_shard_stats(uri: str) -> dict[str, Any]:
    with fs.open_input(uri) as f:
        meta = pq.read_metadata(f).metadata or {}
    if schema.SHARD_STATS_KEY not in meta:
        raise InputError(f"{uri} is not a rankformer corpus shard (no shard statistics)")
    return dict(json.loads(meta[schema.SHARD_STATS_KEY]))


def corpus_files(out: str, vocab_hash: str | None = None) -> list[str]:
    """The shard files of a finished corpus, in order, from its manifest (never a bare listing,
    which could include another run's leftovers). With ``vocab_hash``, refuse a corpus made
    with another vocabulary."""
    uri = fs.join(out, schema.CORPUS_MANIFEST)
    if not fs.exists(uri):
        raise InputError(
            f"{out} holds no finished corpus (no {schema.CORPUS_MANIFEST}); run or "
            "rerun `rankformer tokenize` to finish it"
        )
    manifest = fs.read_json(uri, "rerun `rankformer tokenize` into a new --out folder")
    if vocab_hash is not None and manifest["vocab_hash"] != vocab_hash:
        raise InputError(
            f"corpus {out} was tokenized with vocabulary {manifest['vocab_hash']}, not "
            f"{vocab_hash}; use the vocabulary it was made with or tokenize again"
        )
    return [fs.join(out, s["name"]) for s in manifest["shards"]]
