"""Ray Serve endpoints: embeddings and in silico perturbation of cells sent over HTTP.

One autoscaled deployment is both the FastAPI ingress and the model: it checks and converts
requests (pydantic models: every bad input is a 4xx naming the field, never a 500) and holds a
model (``models:/NAME@ALIAS``, a path or ``s3://``) with its vocabulary. (A separate ingress
deployment in front of a model deployment doubles the Serve overhead per request, which on CPU
costs more than the `tiny` model's forward pass.) Raw counts are tokenized by the corpus pipeline's own code
(:func:`rankformer.api.tokenize_anndata`); embeddings and perturbation scores come from the batch
jobs' own code (:class:`rankformer.perturb.Perturber`), so they equal the jobs' to float precision.
``/v1/embed`` requests are batched dynamically (``@serve.batch``) and their cells regrouped by
length. Updating the deployment's ``user_config`` (e.g. bumping ``revision`` after moving the
registry alias) reloads the model in the running replicas, which answer with the old model until
the new one is loaded.
"""

# No `from __future__ import annotations` here: FastAPI inside a Serve ingress class must see the
# request models as classes, not as strings it cannot resolve in the replica.
import asyncio
import math
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from rankformer import schema

API_KEY_HEADER = "x-api-key"
DEPLOYMENT = "RankformerServer"


@dataclass
class ServeConfig:
    """`rankformer serve`: embedding and perturbation endpoints on Ray Serve."""

    model: str  # model: folder, s3:// prefix or models:/NAME@ALIAS
    tracking_uri: str | None = None  # MLflow store for models:/ URIs (default MLFLOW_TRACKING_URI, sqlite)
    host: str = "127.0.0.1"  # address the HTTP proxy binds to
    port: int = 8000  # HTTP port
    api_key_file: str | None = None  # file holding the API key (else RANKFORMER_API_KEY; none: open)
    max_cells_per_request: int = 64  # cells one request may carry
    max_body_bytes: int = 4_000_000  # larger request bodies are refused (413)
    max_ongoing_requests: int = 64  # requests one replica takes at once (the rest queue in the proxy)
    max_batch_size: int = 16  # requests batched into one forward pass at most
    batch_wait_timeout_s: float = 0.0  # how long a batch waits to fill (0: it takes what is queued)
    max_tokens: int = 16_384  # tokens per forward batch (cells x longest)
    min_replicas: int = 1  # autoscaling: fewest model replicas
    max_replicas: int = 2  # autoscaling: most model replicas
    target_ongoing_requests: float = 4.0  # autoscaling: requests per replica it aims at
    upscale_delay_s: float = 3.0  # autoscaling: sustained load before a replica is added
    downscale_delay_s: float = 10.0  # autoscaling: quiet time before a replica is removed
    use_gpu: bool = False  # one GPU per replica
    precision: str = "float32"  # float32 (exact), bfloat16, or float16 (GPU only)
    layer: str = "penultimate"  # default layer: penultimate, last or an index into hidden_states
    name: str = "rankformer"  # Serve application name
    access_log: bool = False  # log every request (Serve's access log costs CPU on the request path)
    revision: int = 0  # bump (with the same model URI) to reload it, e.g. after moving the registry alias

    def __post_init__(self) -> None:
        from rankformer.infer_config import check_layer, check_precision

        check_precision(self.precision, self.use_gpu)
        check_layer(self.layer)


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
        from rankformer.infer_config import check_layer

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


class Prepared(BaseModel):
    """A cell as tokens, with what the conversion found."""

    cell_id: str | None
    tokens: list[int]
    unknown_genes: list[str]
    truncated: bool


def prepare_cell(cell: Cell, vocab: Any, layout: str, max_length: int, names: dict[str, str]) -> Prepared:
    """Token ids of a request cell, with the genes that are not in the vocabulary reported."""
    import scipy.sparse as sp

    from rankformer.api import tokenize_anndata

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
    import anndata as ad
    import pandas as pd

    total = cell.n_counts if cell.n_counts is not None else float(values.sum())
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
    toks = [int(t) for t in table.column(schema.INPUT_IDS)[0].as_py()]
    expressed = int(sum(1 for g, t, v in zip(ids, mapped.tolist(), values, strict=True) if t >= 0 and v > 0))
    return Prepared(
        cell_id=cell.cell_id, tokens=toks, unknown_genes=unknown, truncated=expressed > len(toks) - specials
    )


class ModelCore:
    """The model, its vocabulary, and the batch jobs' embedding and perturbation code."""

    def __init__(
        self, model_uri: str, tracking_uri: str | None, use_gpu: bool, layer: str, precision: str = "float32"
    ) -> None:
        from rankformer import tracking
        from rankformer.classify.labels import symbol_index
        from rankformer.perturb import Perturber

        self.uri = tracking.resolve_uri(tracking_uri)
        self.model_uri = model_uri
        self.info: dict[str, Any] = {"model": model_uri}
        if model_uri.startswith("models:/"):
            v = tracking.model_version_info(self.uri, model_uri)
            self.info.update({"name": v["name"], "version": v["version"], "alias": v["alias"]})
        # keep every layer ("last"): requests choose theirs
        self.worker = Perturber.on_demand(model_uri, self.uri, use_gpu, precision, "last")
        self.layout = str(self.worker.meta["layout"])
        self.vocab = self.worker.vocab
        self.vocab_names = symbol_index(self.vocab)
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
            }
        )

    def view(self, layer: int) -> Any:
        """The model running only the layers ``hidden_states[layer]`` needs (weights shared)."""
        from rankformer.infer import up_to

        if layer not in self.views:
            self.views[layer] = up_to(self.full, layer)
        return self.views[layer]

    def layer_index(self, layer: str | None) -> int:
        from rankformer.infer_config import pick_layer

        return pick_layer(layer or self.default_layer, int(self.worker.model.config.num_hidden_layers))

    def embed(
        self, cells: list[list[int]], layer: int, pooling: str, gene_vectors: bool
    ) -> list[dict[str, Any]]:
        """Cell vectors (and optionally per-gene vectors) for token lists, length-batched."""
        import torch

        from rankformer.infer import batches, hidden_states, mean_pool

        w = self.worker
        out: list[dict[str, Any]] = [{} for _ in cells]
        arrays = [np.asarray(c, dtype=np.int64) for c in cells]
        with torch.no_grad():
            for b in batches(arrays, w.pad, w.spec["max_tokens"]):
                h = hidden_states(self.view(layer), b, layer, w.device)
                keep = (b.ids >= w.gene_lo).to(h.device)
                vec = (h[:, 0] if pooling == "cls" else mean_pool(h, keep)).cpu()  # pooled on the device
                h = h.cpu() if gene_vectors else h
                for j, i in enumerate(b.index.tolist()):
                    out[i]["embedding"] = vec[j].tolist()
                    if gene_vectors:
                        pos = np.flatnonzero(arrays[i] >= w.gene_lo)
                        out[i]["gene_vectors"] = {w.gene_of[int(arrays[i][p])]: h[j, p].tolist() for p in pos}
        return out

    def perturb(self, tokens: list[int], genes: list[str], req: PerturbRequest, layer: int) -> dict[str, Any]:
        import torch

        from rankformer.infer import Batch, hidden_states

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
        rows, per_gene = w.score_cell(cell, h0[0], "request")
        for r in rows:
            r.pop(schema.CELL_ID, None)
            if req.per_gene:
                r["gene_cosines"] = {
                    g["affected_gene"]: g["cosine"] for g in per_gene if g["perturbed"] == r["perturbed"]
                }
        return {"results": rows, "unknown_genes": unknown}


def read_api_key(cfg: ServeConfig) -> str | None:
    if cfg.api_key_file:
        with open(cfg.api_key_file) as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"api key file {cfg.api_key_file} is empty")
        return key
    return os.environ.get("RANKFORMER_API_KEY") or None


class Guard:
    """ASGI middleware (plain ASGI: Starlette's BaseHTTPMiddleware costs far more per request):
    401 without the API key on /v1/ paths when one is set, 413 for bodies over the limit."""

    def __init__(self, app: Any, key: str | None, max_body_bytes: int) -> None:
        self.app, self.key, self.max_body_bytes = app, key, max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from fastapi.responses import JSONResponse

            headers = dict(scope["headers"])
            given = headers.get(API_KEY_HEADER.encode(), b"").decode("latin-1")
            if self.key is not None and scope["path"].startswith("/v1/") and given != self.key:
                detail = f"missing or wrong API key (header {API_KEY_HEADER})"
                await JSONResponse({"detail": detail}, status_code=401)(scope, receive, send)
                return
            size = headers.get(b"content-length", b"").decode("latin-1")
            if size.isdigit() and int(size) > self.max_body_bytes:
                detail = f"request body of {size} bytes is over the limit of {self.max_body_bytes}"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application: a FastAPI ingress bound to a model deployment."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="rankformer", description="Embeddings and in silico perturbation of single cells.")
    key = read_api_key(cfg)

    from fastapi.exceptions import RequestValidationError

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field, without echoing the input (it may hold NaN, or be huge)."""
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    api.add_middleware(Guard, key=key, max_body_bytes=cfg.max_body_bytes)

    autoscaling = {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "metrics_interval_s": 1.0,
        "look_back_period_s": 3.0,
    }

    # One deployment is both the HTTP ingress and the model: a second hop (ingress replica ->
    # model replica) costs more CPU per request than the `tiny` model's forward pass itself.
    @serve.deployment(
        name=DEPLOYMENT,
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": 0.5, "num_gpus": 1 if cfg.use_gpu else 0},
        max_ongoing_requests=cfg.max_ongoing_requests,
        logging_config=serve_logging(cfg),
        user_config={"model": cfg.model, "revision": cfg.revision},
        health_check_period_s=2,
    )
    @serve.ingress(api)
    class Server:
        def __init__(self) -> None:
            self.core: ModelCore | None = None
            self.loaded: tuple[str, int] | None = None
            self.perturbing = threading.Lock()

        async def reconfigure(self, user_config: dict[str, Any]) -> None:
            """Load (or reload) the model named in ``user_config``. The new model loads in a
            thread while requests go on being answered by the old one, then replaces it."""
            uri = str(user_config.get("model") or cfg.model)
            want = (uri, int(user_config.get("revision", 0)))
            if want == self.loaded:
                return
            self.core = await asyncio.to_thread(
                ModelCore, uri, cfg.tracking_uri, cfg.use_gpu, cfg.layer, cfg.precision
            )
            self.loaded = want

        def _core(self) -> ModelCore:
            if self.core is None:
                raise HTTPException(503, "the model is loading")
            return self.core

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/v1/model")
        async def model_info(self) -> dict[str, Any]:
            return {**self._core().info, "revision": self.loaded[1] if self.loaded else None}

        @api.post("/v1/embed")
        async def embed(self, req: EmbedRequest) -> dict[str, Any]:
            if len(req.cells) > cfg.max_cells_per_request:
                raise HTTPException(
                    422,
                    f"cells: {len(req.cells)} cells is over the limit of {cfg.max_cells_per_request} "
                    "per request",
                )
            self._core()  # 503 while the first model loads
            result = await self._embed_batch(req)
            if "error" in result:
                raise HTTPException(422, result["error"])
            return result

        @serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s)
        async def _embed_batch(self, requests: list[EmbedRequest]) -> list[dict[str, Any]]:
            """Tokenize the cells of the batched requests, then one forward pass plan for all their
            cells with the same options (regrouped by length). A request with a bad cell gets
            ``{"error": ...}`` and does not hold up the others."""
            core = self._core()  # the model that answers the whole batch, even mid-reload
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

        @api.post("/v1/perturb")
        async def perturb(self, req: PerturbRequest) -> dict[str, Any]:
            core = self._core()
            try:
                prepared = prepare_cell(req.cell, core.vocab, core.layout, core.max_length, core.vocab_names)
                result = await asyncio.to_thread(self._perturb, core, prepared.tokens, req)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from exc
            return {
                "cell_id": prepared.cell_id,
                "truncated": prepared.truncated,
                "unknown_cell_genes": {
                    "count": len(prepared.unknown_genes),
                    "genes": prepared.unknown_genes[:50],
                },
                **result,
            }

        def _perturb(self, core: ModelCore, tokens: list[int], req: PerturbRequest) -> dict[str, Any]:
            with self.perturbing:  # one perturbation at a time: it sets the worker's options
                return core.perturb(tokens, req.genes, req, core.layer_index(None))

    return Server.bind()  # type: ignore[attr-defined]


def serve_logging(cfg: ServeConfig) -> dict[str, Any]:
    return {"enable_access_log": cfg.access_log, "log_level": "INFO" if cfg.access_log else "WARNING"}


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for `serve run` / `serve deploy` (import path ``rankformer.serving:app_builder``)."""
    from rankformer.cli_config import build

    return build_app(build(ServeConfig, dict(args)))


def serve_document(apps: list[tuple[ServeConfig, str]]) -> dict[str, Any]:
    """A Serve config document (as `serve deploy` takes) for these applications and route prefixes.
    The deployment's ``user_config`` names the model and a revision: bumping only the revision (after
    moving the registry alias) reloads the model in the running replicas instead of replacing them."""
    first = apps[0][0]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": first.host, "port": first.port},
        "logging_config": serve_logging(first),
        "applications": [
            {
                "name": c.name,
                "route_prefix": route,
                "import_path": "rankformer.serving:app_builder",
                "args": {k: v for k, v in asdict(c).items() if v is not None and k != "revision"},
                "deployments": [
                    {"name": DEPLOYMENT, "user_config": {"model": c.model, "revision": c.revision}}
                ],
            }
            for c, route in apps
        ],
    }


def deploy(apps: list[tuple[ServeConfig, str]]) -> None:
    """Check each application's model, join or start Ray, apply a Serve config for these
    applications (declarative, like `serve deploy`: applications left out are removed) and wait
    until they run."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from rankformer.cluster import ensure_ray
    from rankformer.config import ClusterOptions

    for cfg, _ in apps:
        check_model(cfg)  # before a cluster starts
    ensure_ray(ClusterOptions())
    doc = serve_document(apps)
    client = serve_start(
        http_options=doc["http_options"],
        global_logging_config=doc["logging_config"],
        proxy_location="HeadOnly",
    )
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(doc), _blocking=True)
    except TimeoutError as exc:
        raise RuntimeError(f"the Serve application did not start: {_why_not_running(apps)}") from exc


def check_model(cfg: ServeConfig) -> None:
    """The model at the door, from its metadata and config (no weights, no torch): it exists, its
    vocabulary and config agree, and it has the default ``--layer``. A replica that cannot load it
    would otherwise be retried until the deployment times out."""
    from rankformer.infer_config import pick_layer
    from rankformer.loader import inspect_model

    info = inspect_model(cfg.model, cfg.tracking_uri)
    pick_layer(cfg.layer, int(info.config.num_hidden_layers))


def _why_not_running(apps: list[tuple[ServeConfig, str]]) -> str:
    from ray import serve

    try:
        status = serve.status().applications
        return "; ".join(
            f"{c.name}: {status[c.name].status} {status[c.name].message}".strip()
            + "".join(f" ({d}: {s.message})" for d, s in status[c.name].deployments.items() if s.message)
            for c, _ in apps
            if c.name in status
        )
    except Exception as exc:  # the status itself is best effort
        return f"status unavailable ({exc})"


def run_serve(cfg: ServeConfig, block: bool = True) -> str:
    """Start the application on this machine's (or the named) Ray cluster; returns its URL.
    Calling it again with only ``revision`` changed reloads the model in place (e.g. after moving
    the registry alias); other changes replace the replicas."""
    from ray import serve

    deploy([(cfg, "/")])
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"serving {cfg.model} at {url} (docs {url}/docs)", flush=True)
    if block:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


def config_doc(cfg: ServeConfig) -> dict[str, Any]:
    return asdict(cfg)
