"""One cell-classification job's state: the labelled cells, split by group into train, validation
and test, with the pretrained model they fine-tune."""

from __future__ import annotations

import dataclasses

import numpy as np

from rankformer import schema
from rankformer.classify.common import PretrainedOnCorpus
from rankformer.classify.data import cell_label_columns
from rankformer.config.train import FinetuneCellsConfig
from rankformer.errors import InputError
from rankformer.job.cells import Cells, corpus_columns, load_cells, parse_where
from rankformer.job.output import JobOutput
from rankformer.train.finetune import (
    TrainSpec,
    job_spec,
    scratch_dir,
    steps_for,
)
from rankformer.train.ray_train import training_workers

SPLITS = ("train", "validation", "test")


def cell_labels(
    raw: np.ndarray, rename: dict[str, str], keep: list[str], column: str
) -> tuple[np.ndarray, list[str]]:
    """(class index per cell, -1 where dropped; class names) after renaming/merging and filtering."""
    names = np.asarray(
        [rename.get(str(v), str(v)) if v is not None and str(v) != "" else "" for v in raw], dtype=object
    )
    present = sorted({str(n) for n in names if n})
    if keep:
        missing = [c for c in keep if c not in present]
        if missing:
            raise InputError(
                f"classes {missing} are not in column {column!r} (after renaming); it holds {present}"
            )
        classes = list(keep)
    else:
        classes = present
    if len(classes) < 2:
        raise InputError(
            f"cell classification needs two or more classes; column {column!r} holds {classes or 'none'}"
            + (" after filtering" if keep else "")
        )
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index.get(str(n), -1) for n in names], dtype=np.int64), classes


def split_cells(
    y: np.ndarray,
    groups: np.ndarray | None,
    test: float,
    validation: float,
    seed: int,
    group_column: str | None,
) -> np.ndarray:
    """'train' / 'validation' / 'test' per cell. With groups, no group spans two splits."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

    n = len(y)
    split = np.full(n, "train", dtype=object)
    idx = np.arange(n)
    if groups is None:
        sss = StratifiedShuffleSplit(n_splits=1, test_size=test, random_state=seed)
        rest, te = next(sss.split(idx, y))
        split[te] = "test"
        if validation > 0:
            frac = validation / (1 - test)
            sss = StratifiedShuffleSplit(n_splits=1, test_size=frac, random_state=seed + 1)
            _, va = next(sss.split(rest, y[rest]))
            split[rest[va]] = "validation"
        return split
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise InputError(
            f"group column {group_column!r} holds one group ({uniq[0]!r}); a split by group needs two "
            "or more, "
            "or leave --group-column out for a stratified random split"
        )

    def held_out(sub: np.ndarray, frac: float, salt: int) -> np.ndarray:
        k = int(min(len(np.unique(groups[sub])), max(2, round(1 / frac))))
        sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + salt)
        _, out = next(sgkf.split(sub, y[sub], groups[sub]))
        return sub[out]

    te = held_out(idx, test, 0)
    split[te] = "test"
    rest = idx[split == "train"]
    if validation > 0 and len(np.unique(groups[rest])) >= 3:  # keep two or more groups to train on
        split[held_out(rest, validation / (1 - test), 1)] = "validation"
    return split


class CellsOnCorpus(PretrainedOnCorpus):
    """What a cell-classification job (one label column or several) opens first: its label and
    group columns checked in the corpus before the model loads, then the model, then the selected
    cells with those columns and where each came from (for the log-normalised-counts baseline)."""

    def __init__(self, cfg: FinetuneCellsConfig) -> None:
        self.cfg = cfg
        cols = cell_label_columns(cfg)  # before the model loads
        super().__init__(cfg)
        cols += [c for c in (schema.SOURCE_FILE, schema.SOURCE_ROW) if c in corpus_columns(cfg.corpus)]
        self.selected = load_cells(
            cfg.corpus,
            parse_where(cfg.cells_where),
            cols,
            self.manifest["vocab_hash"],
            cfg.limit_cells,
            cfg.seed,
        )

    def rows(self, part: str) -> np.ndarray:
        """The cells of one split (train, validation or test), by index."""
        return np.flatnonzero(self.split == part)

    def checkpoint_each_epoch(self, spec: TrainSpec, lengths: list[int]) -> None:
        """With validation cells, a checkpoint (and its validation score) at least once an epoch."""
        cfg = self.cfg
        if (self.split == "validation").any():
            per_epoch = steps_for(lengths, cfg.batch, 1.0, training_workers(cfg.scale), cfg.optim.grad_accum)
            spec.checkpoint_every = min(cfg.checkpoint_every, per_epoch)

    def check_splits(self) -> None:
        for part in ("train", "test"):
            if not (self.split == part).any():
                raise InputError(f"the {part} split is empty; lower test_fraction or give more groups")

    split: np.ndarray


class CellJob(CellsOnCorpus):
    """One cell-classification job: its cells, labels and splits."""

    def __init__(self, cfg: FinetuneCellsConfig) -> None:
        super().__init__(cfg)
        cells = self.selected
        y, self.classes = cell_labels(
            cells.column(cfg.label_column), cfg.rename, cfg.classes, cfg.label_column
        )
        keep = np.flatnonzero(y >= 0)
        self.dropped = int(len(y) - len(keep))
        self.cells: Cells = cells.take(keep)
        self.y = y[keep]
        groups = self.cells.column(cfg.group_column).astype(str) if cfg.group_column else None
        self.split = split_cells(
            self.y, groups, cfg.test_fraction, cfg.validation_fraction, cfg.seed, cfg.group_column
        )
        self.check_splits()
        self.output = JobOutput(cfg.out, JOB, cfg)
        self.work = scratch_dir(cfg.out)

    def spec(self, run_id: str | None, y: np.ndarray | None = None) -> TrainSpec:
        """A training's spec; ``y``: labels in place of the cells' own (validation scores them too)."""
        cfg = self.cfg
        y = self.y if y is None else y
        tr, va = self.rows("train"), self.rows("validation")
        lengths = [len(self.cells.ids[i]) for i in tr]
        counts = np.bincount(y[tr], minlength=len(self.classes)).tolist()
        spec = job_spec(
            cfg, self.uri, "sequence", len(self.classes), (self.pad, self.gene_lo), lengths, counts, run_id
        )
        self.checkpoint_each_epoch(spec, lengths)
        return dataclasses.replace(
            spec,
            val_ids=[self.cells.ids[i].tolist() for i in va] or None,
            val_y=y[va].tolist() or None,
        )


JOB = "finetune-cells"
