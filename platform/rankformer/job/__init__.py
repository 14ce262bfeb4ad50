"""What every job shares: its output folder, the model-versus-corpus door check, cell selection, shard
tasks and actors."""
