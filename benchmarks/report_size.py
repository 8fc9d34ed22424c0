"""Size and load time of the run report of a large run.

Builds a run of ``--images`` (default 2,000) 32x32 images (.npy, four classes, each class a
bright square in its own quadrant, labels in a CSV), explains it with saliency through a tiny
untrained CNN, writes ``medexplain report``, then opens the page from its file:// URL in
headless Chromium (the system's executable, driven by Playwright) and measures the time to
the ``load`` event and until the viewer has drawn. With ``--volumes`` the images are
32x32x32 volumes instead.

Prints one JSON document: the HTML size in MB, seconds to load and to draw, the seconds the
report took to build, and how many images the run holds.
Usage: ``python benchmarks/report_size.py [--images 2000] [--out DIR] [--volumes]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs import ExplainSettings, explain_run, report_run

CLASSES = ["north-west", "north-east", "south-west", "south-east"]


def build_run(root: Path, n: int, dims: int) -> Path:
    """``n`` images of 32 pixels per axis in four classes, a tiny CNN, a saliency run."""
    rng = np.random.default_rng(0)
    shape = (32,) * dims
    rows = ["path,label"]
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % 4
        image = rng.normal(0, 0.2, shape).astype(np.float32)
        corner = tuple(
            slice(4, 14) if bit == "0" else slice(18, 28) for bit in f"{label:02b}".ljust(dims, "0")
        )
        image[corner] += 1.0
        np.save(root / "data" / f"i{i:05d}.npy", image)
        rows.append(f"data/i{i:05d}.npy,{CLASSES[label]}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    net = build_classifier(CNNConfig(spatial_dims=dims, num_classes=4, widths=(4, 8), norm="none"))
    save_checkpoint(root / "model.pt", net, extra={"class_names": CLASSES})
    settings = ExplainSettings(
        data=str(root / "data.csv"), method="saliency", model=str(root / "model.pt")
    )
    explain_run(settings, root / "run", progress=False, log=lambda *_: None)
    return root / "run"


def load_seconds(page_path: Path) -> tuple[float, float]:
    """Seconds to the ``load`` event and until every viewer canvas holds a drawing."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        start = time.perf_counter()
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        loaded = time.perf_counter() - start
        page.wait_for_function(
            "Array.from(document.querySelectorAll('canvas[data-view]')).every(c => c.width > 0)"
        )
        drawn = time.perf_counter() - start
        browser.close()
    return loaded, drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--volumes", action="store_true")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="report_size_"))
    started = time.perf_counter()
    run = build_run(root, args.images, 3 if args.volumes else 2)
    explained = time.perf_counter() - started
    started = time.perf_counter()
    page = report_run(run, log=lambda *_: None)
    built = time.perf_counter() - started
    loaded, drawn = load_seconds(page)
    print(
        json.dumps(
            {
                "images": args.images,
                "dims": 3 if args.volumes else 2,
                "html_mb": round(page.stat().st_size / 2**20, 2),
                "load_seconds": round(loaded, 2),
                "drawn_seconds": round(drawn, 2),
                "report_seconds": round(built, 1),
                "explain_seconds": round(explained, 1),
                "page": str(page),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
