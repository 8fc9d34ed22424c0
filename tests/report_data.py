"""The small labelled 2D dataset the report tests build runs on."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_two_class_images(root: Path) -> Path:
    """16 images 16x16 of classes a and b (b brighter in a left block) as .npy files in
    ``root`` and their manifest ``root/data.csv``; returns the manifest."""
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(16):
        label = "ab"[i % 2]
        image = rng.normal(0, 0.1, (16, 16)).astype(np.float32)
        if label == "b":
            image[4:12, 2:8] += 1.0
        np.save(root / f"i{i:02d}.npy", image)
        rows.append(f"i{i:02d}.npy,{label}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"
