"""In silico perturbation of a corpus's cells and its statistics (`rankformer perturb`, `perturb stats`)."""
