"""The controls every classification answer is shown beside, so that a model that learnt nothing
cannot pass for one that did.

- Genes: a baseline that knows only each gene's rank statistics in the selected cells (its mean
  relative rank where it occurs and the share of cells it occurs in), scored in the same folds as
  the fine-tuned model. Rank value encoding puts highly and broadly expressed genes early, and many
  gene features (housekeeping, ribosomal, mitochondrial) follow expression: a fine-tuned model
  that does not beat this baseline may have learnt only where genes rank, not what they do.
- Cells: logistic regression on log-normalised counts (log1p of counts per 10,000) of every gene
  of the cells' source files, the same split: the standard single-cell baseline.
- Both: the shuffled-label control (labels permuted, the same training): what chance looks like.

:func:`verdict` says in words whether the model beats them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

MARGIN = 0.02  # a score within this of a control's does not beat it (fold-to-fold noise is larger)


def rank_statistics(cells: Sequence[np.ndarray], n_tokens: int, gene_lo: int) -> np.ndarray:
    """(n_tokens, 2) per token: mean relative rank over its occurrences (0 = first gene of a cell,
    1 = last; 1 where it never occurs) and the share of ``cells`` it occurs in."""
    rank_sum = np.zeros(n_tokens)
    occurrences = np.zeros(n_tokens)
    for ids in cells:
        genes = ids[ids >= gene_lo]
        if len(genes) == 0:
            continue
        rank_sum += np.bincount(
            genes, weights=np.arange(len(genes)) / max(len(genes) - 1, 1), minlength=n_tokens
        )
        occurrences += np.bincount(genes, minlength=n_tokens)
    seen = occurrences > 0
    mean_rank = np.ones(n_tokens)
    mean_rank[seen] = rank_sum[seen] / occurrences[seen]
    return np.stack([mean_rank, occurrences / max(len(cells), 1)], axis=1)


def verdict(what: str, score: float, controls: dict[str, float], metric: str) -> tuple[bool, str]:
    """(whether ``score`` beats every control by more than :data:`MARGIN`, a sentence saying so)."""
    known = {name: s for name, s in controls.items() if s == s}
    beaten = {name: s for name, s in known.items() if score > s + MARGIN}
    if not known:
        return True, f"{what}: {metric} {score:.3f} (no control could be computed)"
    if len(beaten) == len(known):
        best = max(known, key=lambda k: known[k])
        return True, (
            f"{what} beats its controls: {metric} {score:.3f} against {known[best]:.3f} for the best of "
            f"them ({best})"
        )
    lost = ", ".join(f"{name} {s:.3f}" for name, s in known.items() if name not in beaten)
    return False, (
        f"WARNING: {what} does not beat {lost} ({metric} {score:.3f}; a margin of {MARGIN} is needed). "
        "Its answer may come from what those controls know, not from what the model learnt: "
        "pretrain longer or on more cells, check the labels, and read the ranking with care"
    )


def lognorm_counts(x: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(counts per 10,000) of each row."""
    x = sp.csr_matrix(x, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    x = sp.csr_matrix(sp.diags(1e4 / np.clip(totals, 1.0, None)) @ x)
    x.data = np.log1p(x.data)
    return x


def source_counts(
    files: Sequence[str], rows: Sequence[int], manifest: dict[str, Any], chunk_rows: int = 4096
) -> sp.csr_matrix:
    """The raw counts of the cells at (``files[i]``, ``rows[i]``), read from the corpus's source files
    (as the corpus recorded them), over the union of their genes: cells x genes, in input order."""
    from rankformer.config.corpus import ReadOptions
    from rankformer.corpus.inspect import source_path
    from rankformer.io.sources import open_source

    read = ReadOptions(**manifest["config"]["read"])
    files_a, rows_a = np.asarray(files, dtype=object), np.asarray(rows, dtype=np.int64)
    column_of: dict[str, int] = {}
    cells, genes, values = [], [], []
    for recorded in dict.fromkeys(files_a.tolist()):
        at = np.flatnonzero(files_a == recorded)
        at = at[np.argsort(rows_a[at], kind="stable")]
        with open_source(source_path(recorded, manifest), read.gene_id_column, read.counts) as src:
            cols = np.asarray([column_of.setdefault(str(g), len(column_of)) for g in src.gene_ids])
            for start in range(0, len(at), chunk_rows):
                take = at[start : start + chunk_rows]
                lo, hi = int(rows_a[take].min()), int(rows_a[take].max()) + 1
                block = src.read_counts(lo, hi)[rows_a[take] - lo].tocoo()
                cells.append(take[block.row])
                genes.append(cols[block.col])
                values.append(block.data.astype(np.float64))
    shape = (len(files_a), len(column_of))
    if not cells:
        return sp.csr_matrix(shape)
    return sp.csr_matrix((np.concatenate(values), (np.concatenate(cells), np.concatenate(genes))), shape)


def counts_baseline(
    files: Sequence[str],
    rows: Sequence[int],
    manifest: dict[str, Any],
    y: np.ndarray,
    split: np.ndarray,
    seed: int,
) -> np.ndarray:
    """Class probabilities of every cell from a logistic regression on log-normalised counts,
    fitted on the cells whose ``split`` is "train"."""
    from sklearn.linear_model import LogisticRegression

    x = lognorm_counts(source_counts(files, rows, manifest))
    tr = np.flatnonzero(split == "train")
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(x[tr], y[tr])
    prob = np.zeros((len(y), int(y.max()) + 1))
    prob[:, clf.classes_] = clf.predict_proba(x)
    return prob


def majority_class(y: np.ndarray, split: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities that always answer the training split's most common class."""
    prob = np.zeros((len(y), n_classes))
    prob[:, int(np.bincount(y[split == "train"], minlength=n_classes).argmax())] = 1.0
    return prob
