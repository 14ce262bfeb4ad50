"""What a serving replica holds and does, apart from Ray Serve: the request models (pydantic:
every bad input a 4xx naming the field), a request cell as tokens (:func:`prepare_cell`, through
the corpus pipeline's tokenizer), :class:`ModelCore`, the model with the batch jobs' own
embedding and perturbation code, and :class:`Guard`, the API-key and body-size middleware."""

# No `from __future__ import annotations`: FastAPI must see the request models' fields as classes.
import hmac
import math
from collections.abc import Callable
from typing import Any, Literal, Self

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, field_validator, model_validator

from rankformer import schema
from rankformer.config.types import Layout, Precision, as_layout


class Cell(BaseModel):
    """One cell: raw counts, a ranked gene list, or token ids (exactly one)."""

    cell_id: str | None = None
    counts: dict[str, float] | None = Field(None, description="{Ensembl id or symbol: raw count}")
    n_counts: float | None = Field(None, description="total counts (default: the sum of counts)")
    genes: list[str] | None = Field(None, description="genes ranked highest first")
    tokens: list[int] | None = Field(None, description="token ids as in a corpus, specials included")

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        given = [k for k in ("counts", "genes", "tokens") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of counts, genes, tokens (got {given or 'none'})")
        form = given[0]
        if not getattr(self, form):
            raise ValueError(f"{form} is empty: a cell needs at least one gene")
        if self.counts is not None:
            bad = [g for g, v in self.counts.items() if not math.isfinite(v) or v < 0]
            if bad:
                raise ValueError(f"counts must be finite and >= 0; not so for {bad[:5]}")
            if not any(v > 0 for v in self.counts.values()):
                raise ValueError("counts are all zero: a cell needs at least one expressed gene")
        if self.n_counts is not None and (not math.isfinite(self.n_counts) or self.n_counts <= 0):
            raise ValueError("n_counts must be a finite number > 0")
        return self


class EmbedRequest(BaseModel):
    cells: list[Cell] = Field(..., min_length=1)
    layer: str | None = Field(None, description="penultimate, last or an index into hidden_states")
    pooling: Literal["mean", "cls"] = "mean"
    gene_vectors: bool = False

    @field_validator("layer")
    @classmethod
    def _layer(cls, v: str | None) -> str | None:
        from rankformer.config.infer import check_layer

        if v is not None:
            check_layer(v)  # an InputError is a ValueError: a 422 naming the field
        return v


class PerturbRequest(BaseModel):
    cell: Cell
    genes: list[str] = Field(..., min_length=1)
    kind: Literal["delete", "overexpress", "inhibit", "activate"] = "delete"
    together: bool = Field(True, description="perturb the genes together (else each alone)")
    shift: float = Field(0.1, gt=0, le=1)
    per_gene: bool = False


class UnknownGenes(BaseModel):
    count: int = Field(..., description="genes of the request the model's vocabulary lacks")
    genes: list[str] = Field(..., description="the first 50 of them")


class EmbeddedCell(BaseModel):
    cell_id: str | None
    embedding: list[float] = Field(..., description="the cell's vector (hidden_size numbers)")
    gene_vectors: dict[str, list[float]] | None = Field(
        None, description="each gene's state in this cell, by Ensembl id (gene_vectors: true)"
    )
    n_tokens: int
    truncated: bool = Field(..., description="the cell had more genes than the model's length")
    unknown_genes: UnknownGenes


class EmbedResponse(BaseModel):
    cells: list[EmbeddedCell]


class PerturbResult(BaseModel):
    perturbed: list[str] = Field(..., description="the genes perturbed together (Ensembl ids)")
    rank: int = Field(..., description="where the (first) gene stood in the cell's ranking")
    cell_cosine: float = Field(..., description="cosine of the cell's embedding before and after")
    gene_mean_cosine: float = Field(..., description="mean cosine of the other genes' states")
    gene_cosines: dict[str, float] | None = Field(None, description="each other gene's cosine (per_gene)")


class PerturbResponse(BaseModel):
    cell_id: str | None
    truncated: bool
    unknown_cell_genes: UnknownGenes
    results: list[PerturbResult]
    unknown_genes: list[str] = Field(..., description="requested genes the vocabulary lacks")


class ModelInfo(BaseModel):
    model: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    vocab_hash: str
    layout: str
    max_length: int
    layers: int
    hidden_size: int
    device: str
    precision: str
    max_tokens: int
    revision: int | None = None


class Prepared(BaseModel):
    """A cell as tokens, with what the conversion found."""

    cell_id: str | None
    tokens: list[int]
    unknown_genes: list[str]
    truncated: bool


def prepare_cell(cell: Cell, vocab: Any, layout: Layout, max_length: int, names: dict[str, str]) -> Prepared:
    """Token ids of a request cell, with the genes that are not in the vocabulary reported."""
    cls, eos = vocab.specials.get(schema.CLS), vocab.specials.get(schema.EOS)
    specials = 2 if layout == "v2" else 0
    if cell.tokens is not None:
        n_tokens = vocab.n_tokens  # a property that scans the vocabulary: once per cell
        bad = [t for t in cell.tokens if not 0 <= t < n_tokens]
        if bad:
            raise ValueError(f"tokens {bad[:5]} are outside the vocabulary (0..{n_tokens - 1})")
        toks = list(cell.tokens)
        return Prepared(
            cell_id=cell.cell_id, tokens=toks[:max_length], unknown_genes=[], truncated=len(toks) > max_length
        )
    ids = list(cell.genes if cell.genes is not None else (cell.counts or {}))
    mapped = vocab.map_gene_ids(ids, extra_aliases=names)
    unknown = [g for g, t in zip(ids, mapped.tolist(), strict=True) if t < 0]
    if len(unknown) == len(ids):
        raise ValueError(f"none of the cell's {len(ids)} genes is in the model's vocabulary")
    if cell.genes is not None:
        body = list(dict.fromkeys(t for t in mapped.tolist() if t >= 0))
        limit = max_length - specials
        toks = ([cls] if specials else []) + body[:limit] + ([eos] if specials else [])
        return Prepared(cell_id=cell.cell_id, tokens=toks, unknown_genes=unknown, truncated=len(body) > limit)
    values = np.asarray([cell.counts[g] for g in ids], dtype=np.float64)  # type: ignore[index]
    total = cell.n_counts if cell.n_counts is not None else float(values.sum())
    # each gene by its vocabulary id: a symbol known only from the vocabulary's names maps here
    known = mapped >= 0
    as_ids = np.asarray(ids, dtype=object)
    as_ids[known] = vocab.gene_id_by_token[mapped[known]]
    toks = _counts_tokens(values, as_ids, total, vocab, layout, max_length)
    expressed = int(sum(1 for g, t, v in zip(ids, mapped.tolist(), values, strict=True) if t >= 0 and v > 0))
    return Prepared(
        cell_id=cell.cell_id, tokens=toks, unknown_genes=unknown, truncated=expressed > len(toks) - specials
    )


def _counts_tokens(
    values: np.ndarray, ids: np.ndarray, total: float, vocab: Any, layout: Layout, max_length: int
) -> list[int]:
    """One cell's raw counts through the corpus pipeline's own tokenizer."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from rankformer.corpus.memory import tokenize_anndata

    adata = ad.AnnData(
        X=sp.csr_matrix(values[None, :]),
        obs=pd.DataFrame({schema.N_COUNTS: [total]}, index=["0"]),
        var=pd.DataFrame({schema.DEFAULT_GENE_ID_COLUMN: ids}, index=[str(i) for i in range(len(ids))]),
    )
    table = tokenize_anndata(
        adata,
        vocab,
        layout=layout,
        max_length=max_length,
        coverage_floor=0.0,
        allow_normalized=True,
        report=False,  # one line per request would flood the replica's log
    )
    if table.num_rows == 0:
        raise ValueError("no expressed gene of the cell is in the model's vocabulary")
    return [int(t) for t in table.column(schema.INPUT_IDS)[0].as_py()]


class ModelCore:
    """The model, its vocabulary, and the batch jobs' embedding and perturbation code."""

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str | None,
        use_gpu: bool,
        layer: str,
        precision: Precision = "float32",
        max_tokens: int | None = None,
    ) -> None:
        from rankformer import tracking
        from rankformer.perturb.perturber import Perturber

        self.uri = tracking.resolve_uri(tracking_uri)
        self.model_uri = model_uri
        self.info: dict[str, Any] = {"model": model_uri}
        if model_uri.startswith("models:/"):
            v = tracking.model_version_info(self.uri, model_uri)
            self.info.update({"name": v["name"], "version": v["version"], "alias": v["alias"]})
        # keep every layer ("last"): requests choose theirs
        self.worker = Perturber.on_demand(model_uri, self.uri, use_gpu, precision, "last", max_tokens)
        self.layout = as_layout(self.worker.meta["layout"])
        self.vocab = self.worker.vocab
        self.vocab_names = self.vocab.symbol_index
        self.max_length = self.worker.max_length
        self.default_layer = layer
        self.layer_index(None)  # a default layer this model lacks stops the replica here, named
        self.full = self.worker.model
        self.views: dict[int, Any] = {}
        self.info.update(
            {
                "vocab_hash": self.vocab.content_hash,
                "layout": self.layout,
                "max_length": self.max_length,
                "layers": int(self.worker.model.config.num_hidden_layers),
                "hidden_size": int(self.worker.model.config.hidden_size),
                "device": self.worker.device.type,
                "precision": precision,
                "max_tokens": self.worker.max_tokens,
            }
        )

    def view(self, layer: int) -> Any:
        """The model running only the layers ``hidden_states[layer]`` needs (weights shared)."""
        from rankformer.model.forward import up_to

        if layer not in self.views:
            self.views[layer] = up_to(self.full, layer)
        return self.views[layer]

    def layer_index(self, layer: str | None) -> int:
        from rankformer.config.infer import pick_layer

        return pick_layer(layer or self.default_layer, int(self.worker.model.config.num_hidden_layers))

    def embed(
        self, cells: list[list[int]], layer: int, pooling: str, gene_vectors: bool
    ) -> list[dict[str, Any]]:
        """Cell vectors (and optionally per-gene vectors) for token lists, length-batched."""
        import torch

        from rankformer.model.forward import batches, hidden_states, mean_pool

        w = self.worker
        out: list[dict[str, Any]] = [{} for _ in cells]
        arrays = [np.asarray(c, dtype=np.int64) for c in cells]
        with torch.no_grad():
            for b in batches(arrays, w.pad, w.max_tokens):
                h = hidden_states(self.view(layer), b, layer, w.device)
                keep = (b.ids >= w.gene_lo).to(h.device)
                vec = (h[:, 0] if pooling == "cls" else mean_pool(h, keep)).cpu()  # pooled on the device
                h = h.cpu() if gene_vectors else h
                for j, i in enumerate(b.index.tolist()):
                    out[i]["embedding"] = vec[j].tolist()
                    if gene_vectors:
                        pos = np.flatnonzero(arrays[i] >= w.gene_lo)
                        genes, vectors = w.vocab.gene_id_by_token[arrays[i][pos]], h[j, pos].tolist()
                        out[i]["gene_vectors"] = dict(zip(genes, vectors, strict=True))
        return out

    def perturb(self, tokens: list[int], genes: list[str], req: PerturbRequest, layer: int) -> dict[str, Any]:
        import torch

        from rankformer.model.forward import Batch, hidden_states

        w = self.worker
        mapped = self.vocab.map_gene_ids(genes, extra_aliases=self.vocab_names).tolist()
        unknown = [g for g, t in zip(genes, mapped, strict=True) if t < 0]
        targets = [t for t in mapped if t >= 0]
        if not targets:
            raise ValueError(f"none of the genes {genes[:5]} is in the model's vocabulary")
        cell = np.asarray(tokens, dtype=np.int64)
        w.layer = layer
        w.model = self.view(layer)
        w.configure(
            kind=req.kind,
            mode="together" if req.together else "each",
            targets=targets,
            anchor=None,
            shift=req.shift,
            per_gene=req.per_gene,
            states={},
        )
        ids = torch.as_tensor(cell[None])
        with torch.no_grad():
            h0 = hidden_states(
                w.model, Batch(np.zeros(1, dtype=np.int64), ids, torch.ones_like(ids)), layer, w.device
            )
        gene_parts: list[pa.Table] = []
        rows = (
            w.score_cell(cell, h0[0], "request", gene_parts.append).drop_columns([schema.CELL_ID]).to_pylist()
        )
        cosines: dict[tuple[str, ...], dict[str, float]] = {}
        for part in gene_parts:
            for g in part.select(["perturbed", "affected_gene", "cosine"]).to_pylist():
                cosines.setdefault(tuple(g["perturbed"]), {})[g["affected_gene"]] = g["cosine"]
        if req.per_gene:
            for r in rows:
                r["gene_cosines"] = cosines.get(tuple(r["perturbed"]), {})
        return {"results": rows, "unknown_genes": unknown}


def embed_requests(core: ModelCore, requests: list[EmbedRequest]) -> list[dict[str, Any]]:
    """The answers to a batch of embedding requests: their cells tokenized, then one forward-pass
    plan for all cells asking the same options (regrouped by length). A request with a bad cell
    or a layer the model lacks gets ``{"error": ...}`` and does not hold up the others."""
    prepared: list[list[Prepared] | None] = []
    out: list[dict[str, Any]] = []
    for req in requests:
        try:
            prepared.append(
                [
                    prepare_cell(c, core.vocab, core.layout, core.max_length, core.vocab_names)
                    for c in req.cells
                ]
            )
            out.append({"cells": [{} for _ in req.cells]})
        except (ValueError, KeyError) as exc:
            prepared.append(None)
            out.append({"error": f"cells: {exc}"})
    groups: dict[tuple[int, str, bool], list[tuple[int, int]]] = {}
    for r, (req, cells_p) in enumerate(zip(requests, prepared, strict=True)):
        if cells_p is None:
            continue
        try:  # a layer this model lacks fails its own request, not the batch it came in
            k = (core.layer_index(req.layer), req.pooling, req.gene_vectors)
        except ValueError as exc:
            out[r] = {"error": f"layer: {exc}"}
            continue
        groups.setdefault(k, []).extend((r, i) for i in range(len(cells_p)))
    for (layer, pooling, genes), where in groups.items():
        tokens = [prepared[r][i].tokens for r, i in where]  # type: ignore[index]
        for (r, i), v in zip(where, core.embed(tokens, layer, pooling, genes), strict=True):
            p = prepared[r][i]  # type: ignore[index]
            out[r]["cells"][i] = {
                "cell_id": p.cell_id,
                **v,
                "n_tokens": len(p.tokens),
                "truncated": p.truncated,
                "unknown_genes": {"count": len(p.unknown_genes), "genes": p.unknown_genes[:50]},
            }
    return out


API_KEY_HEADER = "x-api-key"


class Guard:
    """ASGI middleware (plain ASGI: Starlette's BaseHTTPMiddleware costs far more per request):
    401 without the API key on /v1/ paths when one is set (compared in constant time), 413 for a
    body over the limit, counted on the bytes received (a chunked request has no length to trust
    or refuse early)."""

    def __init__(self, app: Any, key: Callable[[], str | None], max_body_bytes: int) -> None:
        # the key is read where the middleware is built, in the replica (from its environment or
        # mounted Secret), never carried in the application from where it was built
        self.app, self.key, self.max_body_bytes = app, key(), max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(API_KEY_HEADER.encode(), b"")
            if not hmac.compare_digest(given, self.key.encode()):
                await _refuse(
                    401, f"missing or wrong API key (header {API_KEY_HEADER})", scope, receive, send
                )
                return
        size = headers.get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.max_body_bytes:
            detail = f"request body of {size} bytes is over the limit of {self.max_body_bytes}"
            await _refuse(413, detail, scope, receive, send)
            return
        body, more = await _read_body(receive, self.max_body_bytes)
        if more:
            await _refuse(
                413, f"request body over the limit of {self.max_body_bytes} bytes", scope, receive, send
            )
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Any, limit: int) -> tuple[bytes, bool]:
    """The request body, read until its end or until it passes ``limit`` bytes; (the bytes read,
    whether it went past the limit)."""
    parts: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"".join(parts), False
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return b"", True
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts), False


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body already read, then the connection's own messages."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(status: int, detail: str, scope: Any, receive: Any, send: Any) -> None:
    from fastapi.responses import JSONResponse

    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
