"""Medians, tokenization and inspection of a corpus, and reading a finished one."""
