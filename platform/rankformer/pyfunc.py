"""MLflow's ``python_function`` flavor of a rankformer model folder (the ``loader_module`` its
``MLmodel`` names; see :mod:`rankformer.model.mlflow_model`).

``predict(df)`` takes tokenized cells (``input_ids``; ``cell_id`` optional) and answers as the jobs
do, through the same classes: a pretrained model each cell's embedding, ``(cells, hidden)``
float32 (param ``pooling``: mean or cls), as `rankformer embed` writes it; a cell classifier
``cell_id``, ``predicted`` and ``prob_<class>`` per cell, as `rankformer predict cells`; a gene
classifier the per-gene table of `rankformer predict genes`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rankformer import schema
from rankformer.errors import InputError
from rankformer.model.loader import model_meta
from rankformer.model.store import CLASSIFIED_BY_TASK
from rankformer.notebook import Classifier, Model


class RankformerPyfunc:
    """What MLflow's ``PyFuncModel`` calls: ``predict(model_input, params)``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.classifier = model_meta(path).get("task") in CLASSIFIED_BY_TASK
        self._model: Model | Classifier = Classifier(path) if self.classifier else Model(path)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray | pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if schema.INPUT_IDS not in frame.columns:
            raise InputError(
                f"the model input needs an {schema.INPUT_IDS!r} column of token id lists (tokenized cells, "
                f"as rankformer.tokenize_anndata gives them); it has {list(frame.columns)}"
            )
        cells = pd.DataFrame(
            {schema.INPUT_IDS: [np.asarray(c, dtype=np.int64) for c in frame[schema.INPUT_IDS]]}
        )
        if schema.CELL_ID in frame.columns:
            cells[schema.CELL_ID] = frame[schema.CELL_ID].astype(str).to_numpy()
        if isinstance(self._model, Classifier):
            return self._model.predict(cells)
        pooling = str((params or {}).get("pooling", "mean"))
        return self._model.embed(cells, pooling=pooling)  # type: ignore[arg-type]


def _load_pyfunc(path: str) -> RankformerPyfunc:
    """MLflow's entry point: ``path`` is the downloaded model folder."""
    return RankformerPyfunc(path)
