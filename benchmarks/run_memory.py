"""Peak memory of a resumable ``explain`` run on 200 vs 2000 small images (32x32 .npy,
saliency): the store streams chunks, so the peak must not grow with the number of images.

    .venv/bin/python benchmarks/run_memory.py            # prints JSON

Each size runs in a fresh process (peak RSS is per process: ``ru_maxrss``); tracemalloc
reports the Python-heap peak of the explain call alone.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = (200, 2000)


def make_data(root: Path, n: int) -> None:
    from medexplain.models.checkpoint import save_checkpoint
    from medexplain.models.cnn import CNNConfig, build_classifier

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "data" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i:05d}.npy", rng.random((32, 32), dtype=np.float32))
    net = build_classifier(CNNConfig(num_classes=2, widths=(8, 16)))
    save_checkpoint(root / "model.pt", net, extra={"class_names": ["a", "b"]})


def child(root: Path) -> None:
    import tracemalloc

    from medexplain.runs import ExplainSettings, explain_run

    settings = ExplainSettings(
        data=str(root / "data"), method="saliency", model=str(root / "model.pt"), batch_size=32
    )
    tracemalloc.start()
    start = time.perf_counter()
    summary = explain_run(settings, root / "run", progress=False, log=lambda m: None)
    _, heap_peak = tracemalloc.get_traced_memory()
    print(
        json.dumps(
            {
                "n_images": summary["n_done"],
                "seconds": time.perf_counter() - start,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "python_heap_peak_mb": heap_peak / 2**20,
            }
        )
    )


def main() -> None:
    results = []
    for n in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_data(root, n)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(root)],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "run_memory", "method": "saliency", "runs": results}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]))
    else:
        main()
