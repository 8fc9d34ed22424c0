"""The warping simulator on the brain cohort's atrophy, one run per setting.

Data and classifier are the brain cohort demo's (``medexplain demo --cohort brain``, 3D or
its axial slice with ``--dims 2``): the same cohort, split and MONAI DenseNet, trained once
and kept in ``--cache`` (``classifier_<dims>d.pt``) so that every setting explains the same
network. Each ``--setting`` (``key=value,key=value``: warping-simulator parameters, e.g.
``magnitude_weight=10,epochs=40``; ``demo`` for the demo's own ``warp_params``) fits one
simulator through the demo's own step (:func:`medexplain.demo.warp.run_warp_section`) and is
scored on the test volumes the classifier gets right, as the demo scores it
(:func:`medexplain.metrics.warp.evaluate_warp_simulator`): the fraction reaching the
requested log-odds shift per direction, the localisation AUROC of ``|log J|`` against the
atrophy evidence (removal) and the template's atrophy region (injection), folding, and the
cycle error. ``epochs`` bounds a fit by steps so that settings compare at equal training
(``--seconds`` is only a safety cap); the seconds and steps of each fit are reported.

Prints one JSON document. Usage: ``python benchmarks/warp_brain.py --dims 2
--setting demo --setting magnitude_weight=3 [--cache DIR] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from medexplain.cli import parse_params
from medexplain.demo.prepare import generate_data, train_model
from medexplain.demo.settings import DemoSettings
from medexplain.demo.state import DemoState
from medexplain.demo.warp import run_warp_section
from medexplain.models.checkpoint import load_checkpoint

SCORES = (
    "margin",
    "reached_removal",
    "reached_injection",
    "auroc_removal",
    "auroc_injection",
    "folding_fraction",
    "cycle_relative_mse",
)


def _setting(text: str, demo_params: dict) -> dict:
    if text == "demo":
        return dict(demo_params)
    return {**demo_params, **parse_params([p for p in text.split(",") if p])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--setting", action="append", default=None)
    parser.add_argument("--seconds", type=float, default=1800.0, help="safety cap per fit")
    parser.add_argument("--images", type=int, default=24, help="test images per direction")
    parser.add_argument("--cache", default=None, help="folder keeping the trained classifier")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="warp_brain_"))
    cache.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.for_run(dims=args.dims, cohort="brain")
    state = generate_data(DemoState(cache, settings, False, torch.device("cpu")))
    checkpoint = cache / f"classifier_{args.dims}d.pt"
    if checkpoint.exists():
        state.model, _ = load_checkpoint(checkpoint)
    else:
        state = train_model(state)
        (cache / "classifier.pt").replace(checkpoint)
    runs = []
    for text in args.setting or ["demo"]:
        params = _setting(text, settings.warp_params)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            entry, _ = run_warp_section(
                state.model,
                state.train,
                state.val,
                state.test,
                Path(out),
                max_seconds=args.seconds,
                n_images=args.images,
                progress=False,
                **params,
            )
        scores = entry["scores"]
        runs.append(
            {
                "setting": text,
                "parameters": params,
                **{key: scores.get(key) for key in SCORES},
                "fit": entry["fit"],
                "seconds_total": time.perf_counter() - started,
            }
        )
    print(
        json.dumps(
            {"dims": args.dims, "shape": list(state.test.images.shape[2:]), "runs": runs},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
