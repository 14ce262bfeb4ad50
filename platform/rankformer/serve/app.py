"""Ray Serve endpoints: embeddings and in silico perturbation of cells sent over HTTP.

One autoscaled deployment is both the FastAPI ingress and the model: it checks and converts
requests (pydantic models: every bad input is a 4xx naming the field, never a 500) and holds a
model (``models:/NAME@ALIAS``, a path or ``s3://``) with its vocabulary. (A separate ingress
deployment in front of a model deployment doubles the Serve overhead per request, which on CPU
costs more than the `tiny` model's forward pass.) Raw counts are tokenized by the corpus pipeline's own code
(:func:`rankformer.api.tokenize_anndata`); embeddings and perturbation scores come from the batch
jobs' own code (:class:`rankformer.perturb.perturber.Perturber`), so they equal the jobs' to float precision.
``/v1/embed`` requests are batched dynamically (``@serve.batch``) and their cells regrouped by
length. Updating the deployment's ``user_config`` (e.g. bumping ``revision`` after moving the
registry alias) reloads the model in the running replicas, which answer with the old model until
the new one is loaded.
"""

# No `from __future__ import annotations` here: FastAPI inside a Serve ingress class must see the
# request models as classes, not as strings it cannot resolve in the replica.
import asyncio
import functools
import logging
import os
import threading
from dataclasses import asdict
from typing import Any

from rankformer.config.serve import ServeConfig
from rankformer.errors import InputError
from rankformer.serve.core import (
    API_KEY_HEADER,
    EmbedRequest,
    EmbedResponse,
    Guard,
    ModelCore,
    ModelInfo,
    PerturbRequest,
    PerturbResponse,
    embed_requests,
    prepare_cell,
)

DEPLOYMENT = "RankformerServer"
REPLICA_CPUS = 0.5  # a replica's CPU reservation: its forward passes are short and mostly wait


API_KEY_ENV = "RANKFORMER_API_KEY"


def read_api_key(api_key_file: str | None) -> str | None:
    """The API key, read where this runs (a replica: its mounted Secret file or its environment,
    never a value carried in the application from the machine that built it); None: open."""
    if api_key_file:
        try:
            with open(api_key_file) as f:
                key = f.read().strip()
        except FileNotFoundError as exc:
            raise ValueError(
                f"api key file {api_key_file} not found where the replica runs; mount the Secret there "
                f"(deploy/kuberay) or set {API_KEY_ENV}"
            ) from exc
        if not key:
            raise ValueError(f"api key file {api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _fastapi(cfg: ServeConfig) -> Any:
    """The HTTP app: API-key and body-size guard, and 422s that name each bad field. The key is
    declared as an OpenAPI security scheme (the docs page's "Authorize" sends it)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    api = FastAPI(
        title="rankformer",
        description="Embeddings and in silico perturbation of single cells. The /v1/ paths need the "
        f"API key in the {API_KEY_HEADER} header when the server has one.",
    )

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field, without echoing the input (it may hold NaN, or be huge)."""
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    api.add_middleware(
        Guard, key=functools.partial(read_api_key, cfg.api_key_file), max_body_bytes=cfg.max_body_bytes
    )
    return api


def _key_scheme() -> Any:
    """The API key as an OpenAPI security scheme: the check itself is the Guard's (before the body
    is read); this declares it for /docs and generated clients."""
    from fastapi.security import APIKeyHeader

    return APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's API key")


def _autoscaling(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "metrics_interval_s": 1.0,
        "look_back_period_s": 3.0,
    }


class _Replica:
    """The model side of a replica: the loaded model, (re)loading it, one perturbation at a time."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.core: ModelCore | None = None
        self.loaded: tuple[str, int] | None = None
        self.perturbing = threading.Lock()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load (or reload) the model named in ``user_config``. The new model loads in a thread
        while requests go on being answered by the old one, then replaces it."""
        cfg = self.cfg
        uri = str(user_config.get("model") or cfg.model)
        want = (uri, int(user_config.get("revision", 0)))
        if want == self.loaded:
            return
        self.core = await asyncio.to_thread(
            ModelCore, uri, cfg.tracking_uri, cfg.use_gpu, cfg.layer, cfg.precision, cfg.max_tokens
        )
        self.loaded = want

    def _core(self) -> ModelCore:
        from fastapi import HTTPException

        if self.core is None:
            raise HTTPException(503, "the model is loading")
        return self.core

    def _check_embed(self, req: EmbedRequest) -> None:
        from fastapi import HTTPException

        limit = self.cfg.max_cells_per_request
        if len(req.cells) > limit:
            raise HTTPException(
                422, f"cells: {len(req.cells)} cells is over the limit of {limit} per request"
            )
        self._core()  # 503 while the first model loads

    async def _perturb_request(self, req: PerturbRequest) -> dict[str, Any]:
        from fastapi import HTTPException

        n, limit = 1 if req.together else len(set(req.genes)), self.cfg.max_perturbations_per_request
        if n > limit:
            raise HTTPException(
                422,
                f"genes: {n} perturbations (each gene alone) is over the limit of {limit} per request; "
                "send them in several requests, or run the batch job `rankformer perturb` over a corpus",
            )
        core = self._core()
        try:
            prepared = prepare_cell(req.cell, core.vocab, core.layout, core.max_length, core.vocab_names)
            result = await asyncio.to_thread(self._perturb, core, prepared.tokens, req)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        unknown = {"count": len(prepared.unknown_genes), "genes": prepared.unknown_genes[:50]}
        return {
            "cell_id": prepared.cell_id,
            "truncated": prepared.truncated,
            "unknown_cell_genes": unknown,
            **result,
        }

    def _perturb(self, core: ModelCore, tokens: list[int], req: PerturbRequest) -> dict[str, Any]:
        with self.perturbing:  # one perturbation at a time: it sets the worker's options
            return core.perturb(tokens, req.genes, req, core.layer_index(None))


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application: one deployment, the FastAPI ingress and the model."""
    from fastapi import Depends, HTTPException
    from ray import serve

    api = _fastapi(cfg)
    keyed = [Depends(_key_scheme())]

    # One deployment is both the HTTP ingress and the model: a second hop (ingress replica ->
    # model replica) costs more CPU per request than the `tiny` model's forward pass itself.
    @serve.deployment(
        name=DEPLOYMENT,
        autoscaling_config=_autoscaling(cfg),
        ray_actor_options={"num_cpus": REPLICA_CPUS, "num_gpus": 1 if cfg.use_gpu else 0},
        max_ongoing_requests=cfg.max_ongoing_requests,
        logging_config=serve_logging(cfg),
        user_config={"model": cfg.model, "revision": cfg.revision},
        health_check_period_s=2,
    )
    @serve.ingress(api)
    class Server(_Replica):
        def __init__(self) -> None:
            super().__init__(cfg)
            # read here, at the replica's start: a missing Secret stops the replica, named
            key = read_api_key(cfg.api_key_file)
            logging.getLogger("ray.serve").info("API key %s", "required on /v1/" if key else "not set: open")

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/v1/model", response_model=ModelInfo, dependencies=keyed)
        async def model_info(self) -> dict[str, Any]:
            return {**self._core().info, "revision": self.loaded[1] if self.loaded else None}

        @api.post("/v1/embed", response_model=EmbedResponse, dependencies=keyed)
        async def embed(self, req: EmbedRequest) -> dict[str, Any]:
            self._check_embed(req)
            result = await self._embed_batch(req)
            if "error" in result:
                raise HTTPException(422, result["error"])
            return result

        @serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s)
        async def _embed_batch(self, requests: list[EmbedRequest]) -> list[dict[str, Any]]:
            return embed_requests(self._core(), requests)  # one model answers the whole batch

        @api.post("/v1/perturb", response_model=PerturbResponse, dependencies=keyed)
        async def perturb(self, req: PerturbRequest) -> dict[str, Any]:
            return await self._perturb_request(req)

    return Server.bind()  # type: ignore[attr-defined]


def serve_logging(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "enable_access_log": cfg.access_log,
        "log_level": "INFO" if cfg.access_log else "WARNING",
        "encoding": "JSON" if cfg.json_logs else "TEXT",  # JSON: one object a line, for log collectors
    }


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for `serve run` / `serve deploy` (import path ``rankformer.serve.app:app_builder``)."""
    from rankformer.config.flags import build

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
                "import_path": "rankformer.serve.app:app_builder",
                "args": {k: v for k, v in asdict(c).items() if v is not None and k != "revision"},
                "deployments": [
                    {"name": DEPLOYMENT, "user_config": {"model": c.model, "revision": c.revision}}
                ],
            }
            for c, route in apps
        ],
    }


def deploy(apps: list[tuple[ServeConfig, str]], keep_others: bool = False) -> None:
    """Check each application's model, join or start Ray, apply a Serve config for these
    applications (declarative, like `serve deploy`: applications left out are removed, unless
    ``keep_others`` refuses that) and wait until they run."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from rankformer.cluster import ensure_ray
    from rankformer.config.corpus import ClusterOptions
    from rankformer.placement import Demand

    for cfg, _ in apps:
        check_model(cfg)  # before a cluster starts
    for cfg, _ in apps:  # Serve waits forever for a replica no node can hold
        replicas = Demand(
            f"Serve replicas of {cfg.name}",
            max(cfg.min_replicas, 1),
            cpus=REPLICA_CPUS,
            gpus=1.0 if cfg.use_gpu else 0.0,
            flags="--min-replicas" + (", or leave out --use-gpu" if cfg.use_gpu else ""),
        )
        ensure_ray(ClusterOptions(), replicas)
    doc = serve_document(apps)
    client = serve_start(
        http_options=doc["http_options"],
        global_logging_config=doc["logging_config"],
        proxy_location="HeadOnly",
    )
    _check_running(client, apps, keep_others)
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(doc), _blocking=True)
    except TimeoutError as exc:
        raise RuntimeError(f"the Serve application did not start: {_why_not_running(apps)}") from exc


def _check_running(client: Any, apps: list[tuple[ServeConfig, str]], keep_others: bool) -> None:
    """What a Serve instance already running on this cluster would silently override: its HTTP
    address cannot change while it runs (Serve keeps the old one and only logs a warning), and a
    declarative deploy removes the applications it does not name."""
    from ray import serve

    first = apps[0][0]
    http = client.http_config
    if (http.host, http.port) != (first.host, first.port):
        raise InputError(
            f"Serve already runs on this Ray cluster at http://{http.host}:{http.port}, and its address "
            f"cannot change while it runs: use --host {http.host} --port {http.port}, or stop it first "
            "(`serve shutdown`, or end the `rankformer serve` that started it)"
        )
    others = sorted(set(serve.status().applications) - {c.name for c, _ in apps})
    if keep_others and others:
        raise InputError(
            f"Serve on this Ray cluster runs application(s) {others}, which this deploy would remove; "
            "give --name one of them to replace it, or stop it first (`serve shutdown`)"
        )


def check_model(cfg: ServeConfig) -> None:
    """The model at the door, from its metadata and config (no weights, no torch): it exists, its
    vocabulary and config agree, and it has the default ``--layer``. A replica that cannot load it
    would otherwise be retried until the deployment times out."""
    from rankformer.config.infer import pick_layer
    from rankformer.model.loader import inspect_model

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

    deploy([(cfg, "/")], keep_others=True)
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
