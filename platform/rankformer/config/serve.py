"""`rankformer serve`'s options (the endpoints themselves live in :mod:`rankformer.serve`)."""

from __future__ import annotations

from dataclasses import dataclass

from rankformer.config.infer import check_layer, check_precision
from rankformer.config.types import Precision
from rankformer.errors import InputError


@dataclass
class ServeConfig:
    """`rankformer serve`: embedding and perturbation endpoints on Ray Serve."""

    model: str  # model: folder, s3:// prefix or models:/NAME@ALIAS
    tracking_uri: str | None = None  # MLflow store for models:/ URIs (default MLFLOW_TRACKING_URI, sqlite)
    host: str = "127.0.0.1"  # address the HTTP proxy binds to
    port: int = 8000  # HTTP port
    api_key_file: str | None = None  # API key file each replica reads (else RANKFORMER_API_KEY; open)
    max_cells_per_request: int = 64  # cells one request may carry
    max_perturbations_per_request: int = 256  # genes perturbed each alone per request (more: the perturb job)
    max_body_bytes: int = 4_000_000  # larger request bodies are refused (413)
    max_ongoing_requests: int = 64  # requests one replica takes at once (the rest queue in the proxy)
    max_batch_size: int = 16  # requests batched into one forward pass at most
    batch_wait_timeout_s: float = 0.0  # how long a batch waits to fill (0: it takes what is queued)
    max_tokens: int | None = None  # tokens a forward pass (cells x longest); unset: 16,384, GPU: by memory
    min_replicas: int = 1  # autoscaling: fewest model replicas
    max_replicas: int = 2  # autoscaling: most model replicas
    target_ongoing_requests: float = 4.0  # autoscaling: requests per replica it aims at
    upscale_delay_s: float = 3.0  # autoscaling: sustained load before a replica is added
    downscale_delay_s: float = 10.0  # autoscaling: quiet time before a replica is removed
    use_gpu: bool = False  # one GPU per replica
    precision: Precision = "float32"  # float32 (exact), bfloat16, or float16 (GPU only)
    layer: str = "penultimate"  # default layer: penultimate, last or an index into hidden_states
    name: str = "rankformer"  # Serve application name
    access_log: bool = False  # log every request (Serve's access log costs CPU on the request path)
    json_logs: bool = False  # Serve's logs as one JSON object a line (for log collectors)
    revision: int = 0  # bump (with the same model URI) to reload it, e.g. after moving the registry alias

    def __post_init__(self) -> None:
        self.precision = check_precision(self.precision, self.use_gpu)
        check_layer(self.layer)
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Limits and autoscaling numbers, named before Ray starts (Serve would reject them in its
        controller after a minute of retries)."""
        at_least = {
            "max_cells_per_request": 1,
            "max_perturbations_per_request": 1,
            "max_body_bytes": 1,
            "max_ongoing_requests": 1,
            "max_batch_size": 1,
            "max_tokens": 1,
            "max_replicas": 1,
            "min_replicas": 0,
            "port": 0,
            "revision": 0,
            "batch_wait_timeout_s": 0,
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
        }
        bad = [
            f"--{k.replace('_', '-')} {value} must be >= {lo}"
            for k, lo in at_least.items()
            if (value := getattr(self, k)) is not None and value < lo
        ]
        if self.target_ongoing_requests <= 0:
            bad.append(f"--target-ongoing-requests {self.target_ongoing_requests} must be > 0")
        if self.port > 65535:
            bad.append(f"--port {self.port} must be <= 65535")
        if self.min_replicas > self.max_replicas:
            bad.append(f"--min-replicas {self.min_replicas} must be <= --max-replicas {self.max_replicas}")
        if bad:
            raise InputError("; ".join(bad))
