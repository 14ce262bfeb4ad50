"""What a job places on a Ray cluster, checked against what the cluster has before any work starts.

Ray never refuses work it cannot place: Ray Train workers, actor pools, Tune trials and Serve
replicas that ask for more than any node has wait forever, and Ray Data only warns that "the job
may hang". Every job that places workers or actors states its :class:`Demand` and calls
:func:`check_demand` first; :func:`shortfall` is the arithmetic, a plain function of the demand and
the nodes' resources.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from rankformer.errors import InputError

_EPS = 1e-9


@dataclass(frozen=True)
class Demand:
    """Bundles of resources a job needs placed, and what must still run beside them."""

    what: str  # what the bundles are, plural: "Ray Train workers", "embedding actors"
    count: int  # how many bundles
    cpus: float  # CPUs each
    gpus: float = 0.0  # GPUs each
    flags: str = ""  # the flags that set them, named in the error
    gang: bool = True  # all must run at once (Ray Train, a fixed actor pool); else one is progress
    beside_cpus: float = 0.0  # CPUs a task needs while the bundles run (e.g. the corpus reads)
    beside_what: str = ""  # what that task is
    strategy: str = "PACK"  # Ray's placement strategy: STRICT_PACK puts every bundle on one node


def _res(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")


def _place(demand: Demand, free: list[list[float]], n: int) -> bool:
    """Place ``n`` bundles first fit into ``free`` ([cpus, gpus] per node, updated); whether all fit."""
    used: set[int] = set()
    for _ in range(n):
        order = sorted(range(len(free)), key=lambda i: (free[i][1], free[i][0]))  # scarce GPUs last
        for i in order:
            if demand.strategy == "STRICT_SPREAD" and i in used:
                continue
            if free[i][0] + _EPS >= demand.cpus and free[i][1] + _EPS >= demand.gpus:
                free[i][0] -= demand.cpus
                free[i][1] -= demand.gpus
                used.add(i)
                break
        else:
            return False
    return True


def shortfall(demand: Demand, nodes: list[dict[str, float]]) -> str | None:
    """Why ``demand`` can never run on nodes of these total resources (Ray's ``Resources`` of each
    live node), or None when it can."""
    caps = [[float(n.get("CPU", 0.0)), float(n.get("GPU", 0.0))] for n in nodes]
    total_cpu, total_gpu = sum(c for c, _ in caps), sum(g for _, g in caps)
    have = f"the cluster has {total_cpu:g} CPUs" + (f" and {total_gpu:g} GPUs" if total_gpu else "")
    have += f" on {len(caps)} node{'s' if len(caps) != 1 else ''}"
    each = _res(demand.cpus, demand.gpus)
    if not any(c + _EPS >= demand.cpus and g + _EPS >= demand.gpus for c, g in caps):
        biggest = max(caps, default=[0.0, 0.0], key=lambda r: (r[1], r[0]))
        return (
            f"each of the {demand.what} needs {each}, and no node has that (the largest has "
            f"{_res(biggest[0], biggest[1]) if biggest[0] or biggest[1] else 'nothing'}; {have})"
        )
    n = demand.count if demand.gang else 1
    # (nodes the bundles may use, the other nodes): STRICT_PACK tries each node alone
    pools: list[tuple[list[list[float]], list[list[float]]]] = [([list(r) for r in caps], [])]
    if demand.strategy == "STRICT_PACK":
        pools = [([list(r)], caps[:i] + caps[i + 1 :]) for i, r in enumerate(caps)]
    on = " on one node (STRICT_PACK)" if demand.strategy == "STRICT_PACK" else ""
    why = f"{n} {demand.what} x {each} need {_res(n * demand.cpus, n * demand.gpus)}{on}; {have}"
    for free, others in pools:
        if not _place(demand, free, n):
            continue
        if demand.beside_cpus <= 0 or any(c + _EPS >= demand.beside_cpus for c, _ in free + others):
            return None
        why = (
            f"{n} {demand.what} x {each} leave no {demand.beside_cpus:g} CPU for {demand.beside_what} "
            f"({have}): the {demand.what} would wait for it forever"
        )
    return why


def check_demand(demand: Demand) -> None:
    """Refuse ``demand`` with the numbers and the flags to change when the connected cluster can
    never run it; where an autoscaler can add nodes, say what the job waits for instead."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    why = shortfall(demand, nodes)
    if why is None:
        return
    if can_autoscale():
        print(
            f"waiting for the autoscaler: {why}; the job starts once nodes that fit have joined",
            file=sys.stderr,
        )
        return
    fix = f"; change {demand.flags}" if demand.flags else ""
    raise InputError(f"{why}; this cluster cannot add nodes, so the job would never start{fix}")


def can_autoscale() -> bool:
    """Whether an autoscaler can add nodes to the connected cluster. Autoscaler v2 (KubeRay's
    in-tree autoscaling) records itself in the GCS; v1's monitor publishes a status in which a
    cluster started by hand (`ray start`, `ray.init()`) has only the read-only provider's fixed
    node types, one per node and named after it."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        if _internal_kv_get(b"__autoscaler_v2_enabled", namespace=b"__autoscaler") == b"1":
            return True
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # private APIs: when they move, treat the cluster as fixed (an error, not a hang)
        return False
    if not raw:
        return False
    report = json.loads(raw).get("autoscaler_report") or {}
    pending = report.get("pending_launches") or {}
    types = set(report.get("active_nodes") or {}) | set(pending)
    return bool(types) and not all(str(t).startswith("node_") for t in types)
