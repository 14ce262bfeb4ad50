"""Cell and gene embeddings of a corpus (`rankformer embed`)."""
