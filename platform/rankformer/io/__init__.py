"""Reading cells: local and s3:// files, h5ad, loom and 10x sources, cells in memory, synthetic corpora."""
