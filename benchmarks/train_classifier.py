"""Train the SmallCNN on the default synthetic benchmark and print JSON.

Defaults mirror ``tests/conftest.py`` (BENCH2D, TRAIN2D), so this measures what the test
fixture ``classifier2d`` gets: ``{"test_accuracy", "test_auc", "seconds", ...}`` where
``seconds`` is the training wall time and ``cpu_seconds`` the CPU time it used (summed over
threads; on a shared machine the wall time mostly measures the other processes).
Generation and evaluation times are reported apart.

    .venv/bin/python benchmarks/train_classifier.py [--threads 2] [--epochs 15] ...
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medexplain.data.synthetic import make_benchmark
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.models.train import evaluate_classifier, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--dims", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    bench = make_benchmark(n=args.n, dims=args.dims, size=args.size, seed=args.seed)
    train, val, test = bench.split()
    generate_seconds = time.perf_counter() - start

    config = CNNConfig(
        in_channels=1,
        num_classes=len(train.class_names),
        spatial_dims=args.dims,
        widths=tuple(args.widths),
    )
    model = build_classifier(config)
    cpu_start = time.process_time()
    history = train_classifier(
        model,
        train.dataset(),
        val.dataset(),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_seconds=args.max_seconds,
        progress=args.progress,
    )
    cpu_seconds = time.process_time() - cpu_start
    start = time.perf_counter()
    result = evaluate_classifier(model, test.dataset())
    evaluate_seconds = time.perf_counter() - start

    print(
        json.dumps(
            {
                "test_accuracy": result["accuracy"],
                "test_auc": result["auc"],
                "seconds": round(history.seconds, 2),
                "cpu_seconds": round(cpu_seconds, 2),
                "per_class_auc": result["per_class_auc"],
                "n_train": len(train),
                "n_test": result["n"],
                "epochs_run": len(history.train_loss),
                "best_epoch": history.best_epoch,
                "stop_reason": history.stop_reason,
                "val_accuracy": history.val_metric,
                "train_loss": [round(x, 4) for x in history.train_loss],
                "generate_seconds": round(generate_seconds, 2),
                "evaluate_seconds": round(evaluate_seconds, 2),
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
