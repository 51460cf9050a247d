"""Training: typed configs, optimizer, pure train step, checkpoints, metrics, the SFT loop."""
