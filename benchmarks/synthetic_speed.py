"""Time the synthetic benchmark generator and print JSON.

Issue 2 asks for 2,000 images of 64 x 64 in under 10 s on the project machine (2 CPU
cores). Reports wall and CPU time for the default 2D benchmark and a 3D one, with the
number of torch threads used, for each thread count in ``--threads``.

    .venv/bin/python benchmarks/synthetic_speed.py [--threads 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from medexplain.data.synthetic import make_benchmark

CASES = (
    dict(n=2000, dims=2, size=64),
    dict(n=2000, dims=2, size=64, redundant=True, shortcut=0.5),
    dict(n=500, dims=3, size=32),
)


def _time(kwargs: dict, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        bench = make_benchmark(**kwargs)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    pixels = bench.images[0].numel()
    return {
        **kwargs,
        "wall_s_best": round(min(walls), 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "cpu_s_best": round(min(cpus), 3),
        "images_per_s": round(kwargs["n"] / min(walls), 1),
        "megapixels_per_s": round(kwargs["n"] * pixels / min(walls) / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in CASES:
            results.append({"threads": threads, **_time(case, args.repeats)})
    default = [r for r in results if r["dims"] == 2 and not r.get("redundant")]
    report = {
        "benchmark": "synthetic_speed",
        "target": "2000 images 64x64 (2D default) in < 10 s",
        "meets_target": all(r["wall_s_best"] < 10 for r in default),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
