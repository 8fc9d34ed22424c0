"""Write the test images of the quick demo's benchmark as files, for the command examples.

    python docs/examples/benchmark_files.py bench

writes ``bench/bench.csv`` (columns ``path,label,mask``), ``bench/images/NNNN.npy`` (64 x 64
float32) and ``bench/masks/NNNN.npy`` (the ground-truth evidence of each image; all zero for
a healthy image). The benchmark is the one ``medexplain demo --quick`` trains its classifier
on (1200 images, corner-marker shortcut in the lesion class, seed 0); these are its held-out
test images, so ``runs/quick/classifier.pt`` from that demo explains them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from medexplain.data.synthetic import make_benchmark


def main(out: Path) -> None:
    bench = make_benchmark(1200, dims=2, shortcut=0.7, shortcut_class=1, seed=0)
    test = bench.split(seed=0)[2]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = ["path,label,mask"]
    for i in range(len(test)):
        image = test.images[i, 0].numpy().astype(np.float32)
        mask = test.evidence[i, 0].numpy().astype(np.uint8)
        np.save(out / "images" / f"{i:04d}.npy", image)
        np.save(out / "masks" / f"{i:04d}.npy", mask)
        label = test.class_names[int(test.labels[i])]
        rows.append(f"images/{i:04d}.npy,{label},masks/{i:04d}.npy")
    (out / "bench.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"{len(test)} images -> {out / 'bench.csv'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench"))
