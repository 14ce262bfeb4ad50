"""rankformer: single-cell foundation models of the Geneformer kind, at corpus scale on Ray.

The Python API (imported on first use, so ``import rankformer`` stays instant):
``tokenize_anndata``, ``read_corpus``, ``corpus_vocab``, ``GeneVocab``; ``load_model`` (a :class:`Model` for
in-memory embeddings and perturbation) and ``load_classifier`` (predictions of a fine-tuned
classifier); ``attach`` (a job's output onto the AnnData it came from).
"""

from typing import TYPE_CHECKING, Any

from rankformer.schema import VERSION

if TYPE_CHECKING:  # what editors and type checkers complete; at run time __getattr__ loads them
    from rankformer.api import (
        Classifier,
        GeneVocab,
        Model,
        attach,
        corpus_manifest,
        corpus_vocab,
        dropped_counts,
        load_classifier,
        load_model,
        read_corpus,
        tokenize_anndata,
    )

__version__ = VERSION

__all__ = [
    "Classifier",
    "GeneVocab",
    "Model",
    "attach",
    "corpus_manifest",
    "corpus_vocab",
    "dropped_counts",
    "load_classifier",
    "load_model",
    "read_corpus",
    "tokenize_anndata",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rankformer import api

        return getattr(api, name)
    raise AttributeError(f"module 'rankformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
