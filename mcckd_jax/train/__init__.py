"""Training: state, optimizer, the pure train step, checkpoints and the loop."""
