"""Training: the loop, the run folder, checkpoints, held-out loss, metrics, and small teachers trained here."""
