"""Training: data, the training loop, checkpoints for resuming, distributed runs."""
