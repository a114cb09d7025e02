"""The seed's CNN: its layers and the input normalisation it was trained with."""

from __future__ import annotations

from torch import nn

ARCH = "seed-cnn-3conv-v1"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class Net(nn.Sequential):
    """The layers of the original write-up, unchanged."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 22 * 22, 10),
        )
