"""What the classification jobs ask of their cells beyond the shared selection
(:mod:`rankformer.job.cells`): which cells hold a labelled gene, and a cell job's label and group
columns checked present in the corpus.

Fine-tuning holds the selected cells in memory (token ids, a few bytes per token), as the reference
does; ``max_cells`` caps them with a seeded sample when a corpus is larger than a job needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rankformer.job.cells import check_columns, corpus_columns


def cells_with_tokens(cells: Sequence[np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """Indices of the cells holding at least one of ``tokens``."""
    if len(tokens) == 0:
        return np.zeros(0, dtype=np.int64)
    lookup = np.zeros(int(max(tokens.max(), max((c.max(initial=0) for c in cells), default=0))) + 1, bool)
    lookup[tokens] = True
    return np.asarray([i for i, c in enumerate(cells) if lookup[c].any()], dtype=np.int64)


def cell_label_columns(cfg: Any) -> list[str]:
    """A cell-classification job's label column (or its --tasks' columns) and group column (if
    any), checked present in its corpus (from the schema alone, before any weights load)."""
    names = corpus_columns(cfg.corpus)
    labels = list(getattr(cfg, "tasks", None) or [cfg.label_column])
    check_columns(cfg.corpus, names, labels, "--tasks" if getattr(cfg, "tasks", None) else "--label-column")
    if cfg.group_column:
        check_columns(cfg.corpus, names, [cfg.group_column], "--group-column")
    return labels + ([cfg.group_column] if cfg.group_column else [])
