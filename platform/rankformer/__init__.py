"""rankformer: single-cell foundation models of the Geneformer kind, at corpus scale on Ray."""

__version__ = "0.1.0"
