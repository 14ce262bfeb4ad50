"""In silico perturbations of one cell's token sequence (pure functions; no model).

* ``delete``: the genes' tokens are removed;
* ``overexpress``: the genes move to the front (after ``<cls>`` when present), in the order given;
  listed genes absent from the cell are inserted there too; the result is cut to the model length
  (v1: the tail is cut; v2: the first ``max_length - 1`` tokens are kept and ``<eos>`` appended);
* ``inhibit`` / ``activate``: each gene moves down / up by ``shift`` ranks (a number of positions;
  the job derives it from a fraction of the cell's gene count), staying within the gene part.

Special tokens (``<cls>``, ``<eos>``) never move and are never perturbed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rankformer.config.infer import KINDS


def split_specials(
    cell: np.ndarray, cls: int | None, eos: int | None
) -> tuple[list[int], list[int], list[int]]:
    """(leading specials, genes, trailing specials)."""
    toks = [int(t) for t in cell]
    head = [toks.pop(0)] if cls is not None and toks and toks[0] == cls else []
    tail = [toks.pop()] if eos is not None and toks and toks[-1] == eos else []
    return head, toks, tail


def perturb(
    cell: np.ndarray,
    genes: Sequence[int] | np.ndarray,
    kind: str,
    max_length: int,
    cls: int | None = None,
    eos: int | None = None,
    shift: int = 0,
) -> np.ndarray:
    """The perturbed token sequence; genes absent from the cell are ignored except by overexpress."""
    if kind not in KINDS:
        raise ValueError(f"perturbation {kind!r} is not one of {KINDS}")
    head, body, tail = split_specials(cell, cls, eos)
    targets = [int(g) for g in genes]
    drop = set(targets)
    if kind == "delete":
        body = [t for t in body if t not in drop]
    elif kind == "overexpress":
        body = targets + [t for t in body if t not in drop]
    else:
        step = shift if kind == "inhibit" else -shift
        order = sorted((body.index(g), g) for g in targets if g in body)
        if kind == "inhibit":
            order.reverse()  # move the lowest-ranked first so the others keep their targets
        for _, g in order:
            i = body.index(g)
            body.pop(i)
            body.insert(int(np.clip(i + step, 0, len(body))), g)
    out = head + body + tail
    if len(out) > max_length:
        out = head + body[: max_length - len(head) - len(tail)] + tail
    return np.asarray(out, dtype=np.int64)


def positions_of(cell: np.ndarray, genes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Where each of ``genes`` stands in ``cell`` (tokens unique, every gene there)."""
    order = np.argsort(cell, kind="stable")
    return order[np.searchsorted(cell[order], np.asarray(genes))].astype(np.int64)


def delete_each(cell: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``perturb(cell, [g], "delete", ...)`` for the gene at each position of ``at`` at once: row i
    is the cell without position ``at[i]`` (one gather, no per-variant loop): (len(at), len(cell) - 1)."""
    j = np.arange(len(cell) - 1, dtype=np.int64)
    return cell[j[None, :] + (j[None, :] >= at[:, None])]
