"""Raw files -> Parquet corpus of rank-value encoded cells, one shard per row range, on Ray Data.

Each shard is written whole or not at all (temporary name, then rename; on S3 the object appears
when its upload completes) and carries its own statistics in the Parquet footer, so a rerun skips
finished shards and the manifest is rebuilt from what is on disk.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.cluster import Runner, map_shards, maybe_inject_fault
from rankformer.config.corpus import TokenizeConfig, to_dict
from rankformer.corpus.cells import (
    Chunk,
    FileInfo,
    Shard,
    check_coverage,
    column_tokens,
    coverage,
    inspect_inputs,
    iter_chunks,
    plan_shards,
    warn_if_normalized,
)
from rankformer.corpus.kernels import rank_chunk
from rankformer.corpus.read import read_shard_stats
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.io.base import CellSource
from rankformer.io.sources import open_source
from rankformer.vocab.gene_vocab import GeneVocab, guess_id_kind, load_expected
from rankformer.words import counted


@dataclass
class _Layout:
    max_genes: int
    prefix: int
    suffix: int


def _layout(cfg: TokenizeConfig, vocab: GeneVocab) -> _Layout:
    if cfg.layout == "v2":
        if not vocab.has_v2_specials:
            raise InputError(
                f"vocabulary {cfg.vocab} has no <cls>/<eos> tokens (a Geneformer V1 vocabulary); "
                "use --layout v1, or a V2 vocabulary for the v2 layout"
            )
        return _Layout(cfg.max_genes, vocab.token(schema.CLS), vocab.token(schema.EOS))
    return _Layout(cfg.max_genes, -1, -1)


def _carried_arrays(src: Any, chunk: Chunk, carry: dict[str, str], stop: int) -> dict[str, Any]:
    out = {}
    for obs_name, out_name in carry.items():
        values = src.read_obs(obs_name, chunk.start, stop)[chunk.rows - chunk.start]
        if values.dtype == object:
            out[out_name] = pa.array([None if v is None else str(v) for v in values], pa.string())
        else:
            out[out_name] = pa.array(values)
    return out


def _chunk_table(
    src: Any,
    chunk: Chunk,
    shard: Shard,
    col_token: np.ndarray,
    median: np.ndarray,
    lay: _Layout,
    carry: dict[str, str],
) -> tuple[pa.Table, int]:
    ids, lengths = rank_chunk(
        chunk.counts,
        chunk.n_counts,
        col_token,
        median,
        lay.max_genes,
        lay.prefix,
        lay.suffix,
        src.arithmetic,
    )
    kept = lengths > 0
    offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int32)
    np.cumsum(lengths[kept], out=offsets[1:])
    stop = chunk.start + chunk.n_read
    cell_ids = src.cell_ids(chunk.start, stop)[chunk.rows - chunk.start][kept]
    columns: dict[str, Any] = {
        schema.INPUT_IDS: pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, pa.int32())),
        schema.LENGTH: pa.array(lengths[kept], pa.int32()),
        schema.CELL_ID: pa.array([str(c) for c in cell_ids], pa.string()),
        schema.SOURCE_FILE: pa.array([shard.uri] * int(kept.sum()), pa.string()),
        schema.SOURCE_ROW: pa.array(chunk.rows[kept], pa.int64()),
    }
    for name, arr in _carried_arrays(src, chunk, carry, stop).items():
        columns[name] = arr.filter(pa.array(kept))
    return pa.table(columns), int((~kept).sum())


def encode_source(
    src: CellSource, shard: Shard, cfg: TokenizeConfig, vocab: GeneVocab
) -> Iterator[tuple[pa.Table, Chunk, int]]:
    """(corpus rows, the chunk they came from, cells dropped for having no vocabulary gene) for
    each row chunk of ``shard``: the one path from counts to tokens, for the job and the API."""
    lay = _layout(cfg, vocab)
    median = vocab.median_by_token()
    col_token = column_tokens(vocab, list(src.gene_ids), cfg.read)
    for chunk in iter_chunks(src, shard, cfg.read):
        table, dropped = _chunk_table(src, chunk, shard, col_token, median, lay, cfg.carry)
        yield table, chunk, dropped


def tokenize_shard(task: dict[str, Any]) -> bytes:
    """Tokenize one shard into ``<out>/<shard name>``; return its statistics (JSON)."""
    cfg = TokenizeConfig(**json.loads(task["config"]))
    shard = Shard(task["file_index"], task["uri"], task["shard_index"], task["start"], task["stop"])
    vocab = load_expected(fs.join(cfg.out, schema.CORPUS_VOCAB), task["vocab_hash"])  # once per worker
    stats: dict[str, Any] = {
        "shard": shard.name,
        "file_index": shard.file_index,
        "uri": shard.uri,
        "start": shard.start,
        "stop": shard.stop,
        "cells_in": 0,
        "cells_out": 0,
        "dropped_no_genes": 0,
        "dropped_filter": 0,
        "tokens": 0,
    }
    t0 = time.perf_counter()
    with (
        open_source(shard.uri, cfg.read.gene_id_column, cfg.read.counts) as src,
        fs.open_output_atomic(fs.join(cfg.out, shard.name)) as sink,
    ):
        writer: pq.ParquetWriter | None = None
        for table, chunk, dropped in encode_source(src, shard, cfg, vocab):
            if writer is None:
                # min/max of token lists serve no query and cost ~12% of the write
                stats_cols = [n for n in table.schema.names if n != schema.INPUT_IDS]
                writer = pq.ParquetWriter(sink, table.schema, compression="zstd", write_statistics=stats_cols)
            writer.write_table(table.cast(writer.schema))
            stats["cells_in"] += chunk.n_read
            stats["cells_out"] += table.num_rows
            stats["dropped_no_genes"] += dropped
            stats["dropped_filter"] += chunk.n_filtered
            stats["tokens"] += int(table[schema.LENGTH].to_numpy().sum())
        assert writer is not None  # a shard has at least one row
        writer.add_key_value_metadata({schema.SHARD_STATS_KEY: json.dumps(stats, sort_keys=True)})
        writer.close()
        maybe_inject_fault("before-rename", shard.name)
    # run-time facts go back to the driver only: the footer stays identical across reruns
    stats["seconds"] = time.perf_counter() - t0
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return json.dumps(stats).encode()


def _claim_output(cfg: TokenizeConfig, fingerprint: str) -> None:
    """Refuse an output folder that holds anything but this very corpus (finished or partial)."""
    claim, _ = fs.folder_claim(cfg.out, schema.CORPUS_CLAIM, "corpus")
    if claim is None:
        fs.write_claim(cfg.out, schema.CORPUS_CLAIM, {"fingerprint": fingerprint, "config": to_dict(cfg)})
    elif claim.get("fingerprint") != fingerprint:
        raise InputError(
            f"output {cfg.out} holds a different corpus (inputs, vocabulary or options differ: "
            f"{claim.get('fingerprint')} vs {fingerprint}); choose a new --out folder or delete that one"
        )


def _keep_vocab(cfg: TokenizeConfig, vocab: GeneVocab) -> None:
    """The vocabulary travels in the corpus folder: every worker reads it there (a path given on
    the driver may not exist on another node, or from another working directory), and so does
    every later stage, wherever the corpus is moved."""
    vocab.save(fs.join(cfg.out, schema.CORPUS_VOCAB))  # a rerun writes the same bytes (same hash)


def _check_inputs(cfg: TokenizeConfig, vocab: GeneVocab) -> list[Shard]:
    infos = inspect_inputs(cfg.inputs, cfg.read)
    for info in infos:
        check_info(info, cfg, vocab)
    return plan_shards(infos, cfg.read.rows_per_shard)


def check_info(info: FileInfo, cfg: TokenizeConfig, vocab: GeneVocab, report: bool = True) -> None:
    """Carried columns exist and enough of the counts map to the vocabulary (prints coverage
    when ``report``)."""
    missing = [c for c in cfg.carry if c not in info.obs_columns]
    if missing:
        raise InputError(
            f"{info.uri}: obs has no column(s) {missing} to carry; columns are {info.obs_columns}"
        )
    cov = coverage(info, column_tokens(vocab, info.gene_ids, cfg.read))
    check_coverage(info.uri, cov, cfg.coverage_floor, partial(guess_id_kind, info.gene_ids), report)


def run_tokenize(cfg: TokenizeConfig, runner: Runner = map_shards) -> dict[str, Any]:
    """Tokenize every input; return (and write) the corpus manifest."""
    t0 = time.perf_counter()
    vocab = GeneVocab.load(cfg.vocab)
    _layout(cfg, vocab)
    warn_if_normalized(cfg.read)
    shards = _check_inputs(cfg, vocab)
    fingerprint = cfg.output_fingerprint(vocab.content_hash)
    _claim_output(cfg, fingerprint)
    _keep_vocab(cfg, vocab)
    done = set(fs.listdir(cfg.out))
    pending = [s for s in shards if s.name not in done]
    config_json = json.dumps(to_dict(cfg))
    tasks = [
        {
            "config": config_json,
            "vocab_hash": vocab.content_hash,
            "file_index": s.file_index,
            "uri": s.uri,
            "shard_index": s.shard_index,
            "start": s.start,
            "stop": s.stop,
        }
        for s in pending
    ]
    ran = [json.loads(p) for p in runner(tasks, tokenize_shard, cfg.cluster)] if tasks else []
    manifest = _write_manifest(cfg, vocab, shards, fingerprint)
    for name in fs.listdir(cfg.out):  # leftovers of workers killed mid-write
        if name.startswith(".tmp-"):
            fs.remove(fs.join(cfg.out, name))
    totals = manifest["totals"]
    print(
        f"tokenized {totals['cells_out']:,} of {totals['cells_in']:,} cells "
        f"({totals['dropped_no_genes']:,} without vocabulary genes, {totals['dropped_filter']:,} "
        f"filtered) into {counted(len(shards), 'shard')} ({len(shards) - len(pending)} already done) at "
        f"{cfg.out} in {time.perf_counter() - t0:.1f}s"
    )
    # returned, not written: how this run went (the manifest on disk stays deterministic)
    manifest["run"] = {
        "seconds": time.perf_counter() - t0,
        "tasks": len(ran),
        "peak_rss_mb": max((r["peak_rss_mb"] for r in ran), default=0.0),
    }
    return manifest


def _write_manifest(
    cfg: TokenizeConfig, vocab: GeneVocab, shards: list[Shard], fingerprint: str
) -> dict[str, Any]:
    per_shard = [read_shard_stats(fs.join(cfg.out, s.name)) for s in shards]
    keys = ("cells_in", "cells_out", "dropped_no_genes", "dropped_filter", "tokens")
    files = []
    for fi, uri in enumerate(cfg.inputs):
        mine = [s for s in per_shard if s["file_index"] == fi]
        files.append({"uri": uri, **{k: sum(s[k] for s in mine) for k in keys}})
    manifest = {
        "format": "rankformer-corpus",
        "format_version": 1,
        "software": {"rankformer": schema.VERSION},
        "vocab_hash": vocab.content_hash,
        "fingerprint": fingerprint,
        "config": to_dict(cfg),
        "files": files,
        "shards": [
            {
                "name": s["shard"],
                "file_index": s["file_index"],
                "start": s["start"],
                "stop": s["stop"],
                "rows": s["cells_out"],
            }
            for s in per_shard
        ],
        "totals": {k: sum(f[k] for f in files) for k in keys},
    }
    if any(not (fs.is_remote(u) or os.path.isabs(u)) for u in cfg.inputs):
        manifest["working_dir"] = os.getcwd()  # what the relative input paths mean (`corpus show`)
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    fs.write_bytes_atomic(fs.join(cfg.out, schema.CORPUS_MANIFEST), body)
    return manifest
