"""The model both the trainer and the worker use: the CNN's architecture (net), checkpoint I/O
(checkpoint), calibration applied at serving time (calibration), the device and precision policy
(device) and inference (infer). Imports torch."""

from model.calibration import Calibration
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, weights_version
from model.device import (
    autocast,
    bf16_supported,
    inference_chunk,
    micro_batch,
    pick_device,
    pick_precision,
    prepare,
    train_memory_format,
)
from model.infer import predict_logits, predict_probs
from model.net import ARCH, MNIST_MEAN, MNIST_STD, Net

__all__ = [
    "ARCH",
    "MNIST_MEAN",
    "MNIST_STD",
    "Calibration",
    "Checkpoint",
    "Net",
    "autocast",
    "bf16_supported",
    "inference_chunk",
    "load_checkpoint",
    "micro_batch",
    "pick_device",
    "pick_precision",
    "predict_logits",
    "predict_probs",
    "prepare",
    "save_checkpoint",
    "train_memory_format",
    "weights_version",
]
