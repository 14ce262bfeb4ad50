"""rankformer: single-cell foundation models of the Geneformer kind, at corpus scale on Ray.

The Python API (imported on first use, so ``import rankformer`` stays instant):
``tokenize_anndata``, ``read_corpus``, ``corpus_vocab``, ``GeneVocab``; ``load_model`` (a :class:`Model` for
in-memory embeddings and perturbation) and ``load_classifier`` (predictions of a fine-tuned
classifier).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "Classifier",
    "GeneVocab",
    "Model",
    "corpus_vocab",
    "load_classifier",
    "load_model",
    "read_corpus",
    "tokenize_anndata",
]


def __getattr__(name: str) -> Any:
    if name in ("tokenize_anndata", "read_corpus", "corpus_vocab"):
        from rankformer import api

        return getattr(api, name)
    if name in ("load_model", "Model", "load_classifier", "Classifier"):
        from rankformer import notebook as inference

        return getattr(inference, name)
    if name == "GeneVocab":
        from rankformer.vocab.gene_vocab import GeneVocab

        return GeneVocab
    raise AttributeError(f"module 'rankformer' has no attribute {name!r}")
