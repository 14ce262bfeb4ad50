"""The Python API, one import for notebooks: tokenize cells in memory, read a finished corpus, and
load a model or a fine-tuned classifier to embed, perturb and predict cells in memory.

Each name lives with its stage; this module only gathers them (``import rankformer`` loads them on
first use)."""

from __future__ import annotations

from rankformer.annotate import attach
from rankformer.corpus.memory import dropped_counts, tokenize_anndata
from rankformer.corpus.read import corpus_manifest, corpus_vocab, read_corpus
from rankformer.notebook import Classifier, Model, load_classifier, load_model
from rankformer.vocab.gene_vocab import GeneVocab

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
