"""Data: the aligned synthetic benchmark with ground truth, and user files."""
