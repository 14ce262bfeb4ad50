"""Every model folder is also an MLflow model: an ``MLmodel`` file of the ``python_function``
flavor (with its signature, an input example and the environment files) beside the Hugging Face
files, so MLflow's own tools take it as it is:

    mlflow.pyfunc.load_model("models:/NAME@current").predict(df)   # or a folder, or s3://
    mlflow models serve -m models:/NAME@current --env-manager local

``df`` holds tokenized cells (``input_ids``, as :func:`rankformer.tokenize_anndata` or
``read_corpus`` gives them; ``cell_id`` optional). A pretrained model answers each cell's
embedding; a fine-tuned classifier its class probabilities (:mod:`rankformer.pyfunc` answers).
The folder stays a Hugging Face folder (``from_pretrained`` reads it) and rankformer's loader
still checks it against its vocabulary.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from rankformer import schema
from rankformer.vocab.gene_vocab import GeneVocab

_said = False
LOADER_MODULE = "rankformer.pyfunc"  # a name, not an import: MLflow imports it when it loads
# what the flavor's environment needs (rankformer itself is installed beside it)
REQUIREMENTS = ["torch", "transformers", "pyarrow", "pandas", "anndata", "mlflow"]


def example_cell(vocab: GeneVocab, layout: str) -> list[int]:
    """A short cell of this vocabulary's first genes, framed as ``layout`` frames cells."""
    _, gene_lo = vocab.token_layout()
    tokens = list(range(gene_lo, min(gene_lo + 8, vocab.n_tokens)))
    if layout == "v2":
        tokens = [vocab.specials[schema.CLS], *tokens, vocab.specials[schema.EOS]]
    return tokens


def _save_parameters() -> set[str]:
    import inspect

    import mlflow

    return set(inspect.signature(mlflow.pyfunc.save_model).parameters)


def write_mlflow_files(folder: str, vocab: GeneVocab, meta: dict[str, Any]) -> None:
    """Add ``MLmodel`` and its companions (environment, input example) to a model folder; where
    MLflow is not installed (a bare GPU image), the folder is written without them, said once."""
    global _said
    try:
        import mlflow  # noqa: F401  (whether it is installed; the GPU image lacks it)
    except ImportError:
        if not _said:
            _said = True
            logging.getLogger(__name__).warning(
                "mlflow is not installed: model folders are written without their MLmodel file "
                "(Hugging Face and rankformer load them; MLflow's pyfunc tools need it)"
            )
        return
    import pandas as pd
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec(Array(DataType.long), schema.INPUT_IDS),
            ColSpec(DataType.string, schema.CELL_ID, required=False),
        ]
    )
    classifier = "classes" in meta
    params = None if classifier else ParamSchema([ParamSpec("pooling", DataType.string, "mean")])
    example = pd.DataFrame(
        {schema.INPUT_IDS: [example_cell(vocab, str(meta.get("layout")))], schema.CELL_ID: ["example"]}
    )
    with tempfile.TemporaryDirectory(prefix="rankformer-mlmodel-") as tmp:
        staged = os.path.join(tmp, "m")
        # MLflow would copy a uv project found in the working directory (its lock, its
        # pyproject) into the model: point it at an empty folder instead
        extra = {"uv_project_path": tmp} if "uv_project_path" in _save_parameters() else {}
        chatty = logging.getLogger("mlflow")
        level = chatty.level
        chatty.setLevel(logging.WARNING)  # no "validating input example" line in every job's output
        try:
            _save(staged, extra, inputs, params, example, meta)
        finally:
            chatty.setLevel(level)
        for name in os.listdir(staged):
            shutil.copy(os.path.join(staged, name), os.path.join(folder, name))


def _save(
    staged: str, extra: dict[str, Any], inputs: Any, params: Any, example: Any, meta: dict[str, Any]
) -> None:
    import mlflow
    from mlflow.models import ModelSignature

    mlflow.pyfunc.save_model(
        staged,
        **extra,
        loader_module=LOADER_MODULE,
        signature=ModelSignature(inputs=inputs, params=params),
        input_example=example,
        pip_requirements=REQUIREMENTS,
        metadata={"rankformer_task": str(meta.get("task", "pretraining"))},
    )
