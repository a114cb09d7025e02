"""Training, the model definition, checkpoints and in-process inference (all need torch)."""
