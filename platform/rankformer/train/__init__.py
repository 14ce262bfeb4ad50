"""The training loop, the Ray Train layer, pretraining and the fine-tuning task."""
