"""Training, the model definition, checkpoints and image normalisation.

Submodules import torch only where they need it: ``trainer.images`` is torch-free so the
producer side never pays for (or needs) torch.
"""
