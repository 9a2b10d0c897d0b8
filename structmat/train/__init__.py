"""Training: state, step functions, checkpoints, metrics and the loop."""
