"""minidiff: train, compress, sample and evaluate small DDPMs on MNIST-scale images."""

__version__ = "0.1.0"
