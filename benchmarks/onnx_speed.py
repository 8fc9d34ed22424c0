"""Occlusion and RISE on one network as ONNX (ONNX Runtime) and as TorchScript.

The medexplain CNN (2D 64 x 64 or 3D 32^3) is exported twice, to ONNX with a dynamic batch
and to TorchScript; both are loaded with ``load_model`` and explained with the same
occlusion (and RISE) settings on the same images. The script reports, per method:

- ``seconds``: best of ``--repeats`` wall times for each format;
- ``onnx_over_torchscript``: the time ratio (below 1: ONNX Runtime is faster);
- ``max_abs_difference``: the largest difference between the two formats' maps, and the
  largest |map| value for scale.

Both run with the same number of threads (torch's, which the ONNX session also uses).
Prints one JSON document. Usage: ``python benchmarks/onnx_speed.py [--dims 2] [--images 8]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

from medexplain.explain import create
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.models.external import load_model

SIZES = {2: 64, 3: 32}


def export(net: torch.nn.Module, example: torch.Tensor, folder: Path) -> tuple[Path, Path]:
    """``(model.onnx, model.pt)`` of ``net``: ONNX with a dynamic batch, traced TorchScript."""
    onnx_path, ts_path = folder / "model.onnx", folder / "model.pt"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(onnx_path), dynamo=False, input_names=["x"],
            output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}},
        )  # fmt: skip
        torch.jit.trace(net, example).save(str(ts_path))
    return onnx_path, ts_path


def timed(explainer, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    best, maps = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        maps = explainer(x, 0)
        best = min(best, time.perf_counter() - start)
    assert maps is not None
    return best, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rise-masks", type=int, default=500)
    args = parser.parse_args()

    torch.manual_seed(0)
    size = SIZES[args.dims]
    net = build_classifier(CNNConfig(spatial_dims=args.dims, num_classes=2)).eval()
    x = torch.rand((args.images, 1, *([size] * args.dims)))
    methods = {
        "occlusion": {"window_fraction": 1 / 8},
        "rise": {"n_masks": args.rise_masks},
    }
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        onnx_path, ts_path = export(net, x[:2], Path(folder))
        models = {"onnx": load_model(onnx_path), "torchscript": load_model(ts_path)}
        for method, params in methods.items():
            seconds, maps = {}, {}
            for kind, model in models.items():
                explainer = create(method, model, batch_size=args.batch_size, **params)
                seconds[kind], maps[kind] = timed(explainer, x, args.repeats)
            results[method] = {
                "params": params,
                "seconds": seconds,
                "onnx_over_torchscript": seconds["onnx"] / seconds["torchscript"],
                "max_abs_difference": float((maps["onnx"] - maps["torchscript"]).abs().max()),
                "max_abs_map": float(maps["torchscript"].abs().max()),
            }
    print(
        json.dumps(
            {
                "dims": args.dims,
                "image_size": size,
                "images": args.images,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "methods": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
