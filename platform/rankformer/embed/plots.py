"""`rankformer embed --plot-column`: a UMAP of the cell embeddings coloured by a column, and a
heatmap of each class's mean embedding (also written as a table), streamed over the output shards."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from rankformer.config.infer import EmbedConfig
from rankformer.embed.columns import rows_of
from rankformer.io import fs

UMAP_CELLS = 20_000  # cells the UMAP is fitted on at most: a seeded sample (class means use every cell)


def plot_data(cfg: EmbedConfig, names: list[str]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, int]:
    """Streamed over the output shards, two columns at a time: the UMAP sample's vectors and labels,
    every class's mean vector and cell count, and the number of cells."""
    col = cfg.plot_column or ""
    paths = [fs.join(cfg.out, name) for name in names]
    sizes = []
    for path in paths:
        with fs.open_input(path) as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    total = sum(sizes)
    pick = np.sort(np.random.default_rng(0).choice(total, min(total, UMAP_CELLS), replace=False))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    xs, ls = [], []
    start = 0
    for path, size in zip(paths, sizes, strict=True):
        with fs.open_input(path) as f:
            t = pq.read_table(f, columns=[col, "embedding"])
        x = rows_of(t.column("embedding"))
        labels = np.asarray([str(v) for v in t.column(col).to_pylist()])
        for c in np.unique(labels):
            m = labels == c
            sums[c] = sums.get(c, 0.0) + x[m].sum(0, dtype=np.float64)
            counts[c] = counts.get(c, 0) + int(m.sum())
        here = pick[(pick >= start) & (pick < start + size)] - start
        xs.append(x[here])
        ls.append(labels[here])
        start += size
    classes = sorted(sums)
    vecs = np.stack([sums[c] / counts[c] for c in classes]).astype(np.float32)
    means = pd.DataFrame(vecs, columns=[f"d{i}" for i in range(vecs.shape[1])])
    means.insert(0, "n_cells", [counts[c] for c in classes])
    means.insert(0, col, classes)
    return np.concatenate(xs), np.concatenate(ls), means, total


def plots(cfg: EmbedConfig, out: Any, names: list[str]) -> int:
    """UMAP of (a seeded sample of at most UMAP_CELLS) cell embeddings coloured by ``plot_column``;
    heatmap of every class's mean over all cells, also written as class_means.parquet/.csv. Returns
    the UMAP's cell count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, labels, means, total = plot_data(cfg, names)
    classes = means[cfg.plot_column].tolist()
    if len(x) >= 10:
        import umap

        xy = umap.UMAP(n_neighbors=min(15, len(x) - 1), random_state=0).fit_transform(x)
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for c in classes:
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, label=c)
        sample = f", {len(x):,} of {total:,} cells" if len(x) < total else ""
        ax.set(title=f"UMAP of cell embeddings ({cfg.layer} layer{sample})", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=3, loc="best")
        fig.tight_layout()
        fig.savefig(out.path("umap.png"), dpi=120)
        plt.close(fig)
        out.publish("umap.png")
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(classes) + 1.5))
    ax.imshow(means.iloc[:, 2:].to_numpy(), aspect="auto", cmap="RdBu_r")
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="embedding dimension", title=f"mean embedding per {cfg.plot_column}")
    fig.tight_layout()
    fig.savefig(out.path("class_means.png"), dpi=120)
    plt.close(fig)
    out.publish("class_means.png")
    out.write_table("class_means", means)
    return len(x) if len(x) >= 10 else 0
