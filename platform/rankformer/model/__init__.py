"""BERT models of gene sentences: presets, masking, batching, forward passes, model folders and the
loader (no Ray, no MLflow at import)."""
