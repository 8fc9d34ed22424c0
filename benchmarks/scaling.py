"""Throughput of ``explain`` with the local engine and with 1 and 2 Ray workers (one torch
thread each) on the same data, and the Ray driver's peak memory at two dataset sizes 10x
apart.

    .venv/bin/python benchmarks/scaling.py                  # writes benchmarks/results/scaling.json
    .venv/bin/python benchmarks/scaling.py --images 24 --steps 64 --out scaling_small.json

Throughput: integrated gradients (``--steps`` interpolation steps, so the work per image
dominates) on ``--images`` images 32x32. Each configuration runs in a fresh driver process
that joins one local Ray (2 CPUs) this script starts; ``images_per_second`` counts the
whole ``explain`` call, ``images_per_second_after_startup`` leaves out the time the actors
take to start (import torch, open the model: a few seconds, which the default 480 images
make small against the work on an idle machine). Memory: saliency on ``--memory-images`` and
10x as many images, 2 Ray workers; the driver's peak RSS (``ru_maxrss``, per process) and
its Python-heap peak during the call (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "scaling.json"


def make_data(root: Path, n: int, size: int) -> None:
    from medexplain.models.checkpoint import save_checkpoint
    from medexplain.models.cnn import CNNConfig, build_classifier

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "data" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i:05d}.npy", rng.random((size, size), dtype=np.float32))
    net = build_classifier(CNNConfig(num_classes=2, widths=(8, 16)))
    save_checkpoint(root / "model.pt", net, extra={"class_names": ["a", "b"]})


def child(args: argparse.Namespace) -> None:
    """One driver: explain ``args.root`` with ``args.engine`` and print a JSON line."""
    import tracemalloc

    import torch

    from medexplain.runs import ExplainSettings, explain_run
    from medexplain.runs.ray_engine import RayEngine, RayOptions

    torch.set_num_threads(1)
    root = Path(args.root)
    params = {"n_steps": args.steps} if args.method == "integrated_gradients" else {}
    settings = ExplainSettings(
        data=str(root / "data"),
        method=args.method,
        model=str(root / "model.pt"),
        params=params,
        batch_size=args.batch,
        chunk_size=args.chunk,
    )
    engine, started = None, {}
    if args.engine == "ray":
        engine = RayEngine(RayOptions(address=args.address, workers=args.workers))
        start_actors = engine._start_actors

        def timed(*a, **k):
            t = time.perf_counter()
            actors = start_actors(*a, **k)
            started["seconds"] = time.perf_counter() - t
            return actors

        engine._start_actors = timed
    out = root / f"run_{args.engine}_{args.workers}"
    if args.trace:
        tracemalloc.start()
    start = time.perf_counter()
    summary = explain_run(settings, out, progress=False, log=lambda m: None, engine=engine)
    seconds = time.perf_counter() - start
    heap = tracemalloc.get_traced_memory()[1] / 2**20 if args.trace else None
    startup = started.get("seconds", 0.0)
    n = summary["n_done"]
    record = {
        "engine": args.engine,
        "workers": args.workers if args.engine == "ray" else None,
        "n_images": n,
        "seconds": round(seconds, 2),
        "actor_startup_seconds": round(startup, 2),
        "images_per_second": round(n / seconds, 3),
        "images_per_second_after_startup": round(n / (seconds - startup), 3),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_python_heap_peak_mb": None if heap is None else round(heap, 2),
    }
    print(json.dumps(record))


def run_child(root: Path, engine: str, workers: int, address: str, args, **extra) -> dict:
    command = [sys.executable, __file__, "--child", "--root", str(root), "--engine", engine]
    command += ["--workers", str(workers), "--address", address, "--steps", str(args.steps)]
    command += ["--batch", str(extra.get("batch", args.batch))]
    command += ["--chunk", str(extra.get("chunk", args.chunk))]
    command += ["--method", extra.get("method", "integrated_gradients")]
    if extra.get("trace"):
        command.append("--trace")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="integrated_gradients", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=480, help="images for throughput")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--steps", type=int, default=128, help="integrated-gradient steps")
    parser.add_argument("--batch", type=int, default=4, help="images per explainer call")
    parser.add_argument("--chunk", type=int, default=4, help="images per chunk")
    parser.add_argument("--memory-images", type=int, default=200, help="smaller memory size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    results: dict = {
        "machine": f"{os.cpu_count()} CPU(s); a local Ray with 2 CPUs, 1 torch thread per worker",
        "load_average_at_start": list(os.getloadavg()),
        "throughput": {
            "method": "integrated_gradients",
            "steps": args.steps,
            "images": args.images,
            "image_shape": [args.size, args.size],
            "runs": [],
        },
        "driver_memory": {"method": "saliency", "workers": 2, "runs": []},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "throughput"
            make_data(root, args.images, args.size)
            runs = results["throughput"]["runs"]
            for engine, workers in (("local", 1), ("ray", 1), ("ray", 2)):
                runs.append(run_child(root, engine, workers, address, args))
            rate = {(r["engine"], r["workers"]): r["images_per_second"] for r in runs}
            steady = {
                (r["engine"], r["workers"]): r["images_per_second_after_startup"] for r in runs
            }
            results["throughput"]["ray2_over_ray1"] = round(rate["ray", 2] / rate["ray", 1], 3)
            results["throughput"]["ray1_over_local"] = round(
                rate["ray", 1] / rate["local", None], 3
            )
            results["throughput"]["ray2_over_ray1_after_startup"] = round(
                steady["ray", 2] / steady["ray", 1], 3
            )
            results["throughput"]["ray1_over_local_after_startup"] = round(
                steady["ray", 1] / steady["local", None], 3
            )
            for n in (args.memory_images, 10 * args.memory_images):
                root = Path(tmp) / f"memory{n}"
                make_data(root, n, args.size)
                results["driver_memory"]["runs"].append(
                    run_child(
                        root,
                        "ray",
                        2,
                        address,
                        args,
                        method="saliency",
                        batch=32,
                        chunk=64,
                        trace=True,
                    )
                )
    finally:
        ray.shutdown()
    results["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
