"""Classifiers: small 2D/3D CNNs, one training loop, checkpoints."""
