"""The gene vocabulary (token ids, exact medians, content hash) and the import of Geneformer's
dictionaries."""

from rankformer.vocab.gene_vocab import GeneVocab

__all__ = ["GeneVocab"]
