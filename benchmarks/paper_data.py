"""Data and classifier of the paper-vs-default benchmarks: the synthetic benchmark or a cohort.

``load(None)`` is the default 2D synthetic benchmark with the test suite's classifier
(``tests/conftest.py``, cached in ``tests/.cache``). ``load("brain" | "chest" | "retina")``
is a realistic cohort as the demo builds it (``medexplain.demo.cohorts``: the generator, its
shortcut, the DenseNet) at the demo's default sizes, 2D (the brain cohort's axial
slice), with the classifier trained as the demo trains it (seeded, selected by validation
loss, the demo's epoch, patience and time caps) and cached in ``tests/.cache`` under a key of
these settings. ``--cohort`` options of the ``*_paper.py`` scripts use it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import BENCH2D, CACHE, TRAIN2D, _FileLock, cached_classifier  # noqa: E402

COHORT_CHOICES = ("brain", "chest", "retina")


@dataclass
class PaperData:
    """Splits (each with ``images``, ``labels``, ``evidence``, ``class_names``,
    ``dataset()``, ``mean_image()``), the classifier (eval mode, CPU) and a description."""

    train: Any
    val: Any
    test: Any
    model: nn.Module
    description: dict[str, Any]


def load(cohort: str | None = None, seed: int = 0) -> PaperData:
    """The synthetic benchmark (``None``) or the 2D ``cohort`` with its trained classifier."""
    if cohort is None:
        from medexplain.data.synthetic import make_benchmark

        train, val, test = make_benchmark(**BENCH2D).split()
        model = cached_classifier("classifier2d", BENCH2D, TRAIN2D)
        description = {"data": "synthetic benchmark", **BENCH2D, "model": "SmallCNN"}
        return PaperData(train, val, test, model, description)
    return _load_cohort(cohort, seed)


def _load_cohort(name: str, seed: int) -> PaperData:
    from medexplain.demo.cohorts import make_cohort
    from medexplain.demo.prepare import build_model
    from medexplain.demo.settings import DemoSettings
    from medexplain.models.checkpoint import load_checkpoint, save_checkpoint
    from medexplain.models.train import train_classifier

    if name not in COHORT_CHOICES:
        raise ValueError(f"unknown cohort {name!r}; choose one of {COHORT_CHOICES}")
    settings = DemoSettings.for_run(dims=2, quick=False, cohort=name, seed=seed)
    bench = make_cohort(
        name,
        settings.n_images,
        dims=2,
        seed=seed,
        shortcut=settings.shortcut,
        shortcut_class=settings.shortcut_class,
    )
    train, val, test = bench.split(seed=seed)
    training = {
        "arch": settings.arch,
        "n": settings.n_images,
        "epochs": settings.train_epochs,
        "lr": settings.train_lr,
        "seconds": settings.train_seconds,
        "patience": settings.train_patience,
        "monitor": settings.train_monitor,
        "seed": seed,
        "shortcut": settings.shortcut,
    }
    key = "_".join(f"{k}{v}" for k, v in sorted(training.items()))
    path = CACHE / f"cohort_{name}_{key}.pt"
    CACHE.mkdir(parents=True, exist_ok=True)
    with _FileLock(CACHE / f"cohort_{name}.lock"):
        if not path.exists():
            torch.manual_seed(seed)
            model = build_model(settings, int(bench.images.shape[1]), len(bench.class_names))
            train_classifier(
                model,
                train.dataset(),
                val.dataset(),
                epochs=settings.train_epochs,
                lr=settings.train_lr,
                max_seconds=settings.train_seconds,
                seed=seed,
                progress=False,
                patience=settings.train_patience,
                monitor=settings.train_monitor,
            )
            save_checkpoint(path, model, extra={"class_names": list(bench.class_names)})
    model, _ = load_checkpoint(path)
    model.eval()
    shape = list(bench.images.shape[1:])
    description = {"data": f"{name} cohort (2D, the demo's sizes)", "shape": shape, **training}
    return PaperData(train, val, test, model, description)


def emit(report: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Print ``report`` as JSON and, with ``out``, write it there too; returns it."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return report


def output_name(stem: str, cohort: str | None) -> str:
    """``<stem>.json`` for the benchmark, ``<stem>_<cohort>.json`` for a cohort."""
    return f"{stem}.json" if cohort is None else f"{stem}_{cohort}.json"
