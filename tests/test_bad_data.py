"""Bad images in a long run are recorded in ``errors.csv`` and the run goes on, losing
nothing already computed; a run folder another process is writing is refused, not
interleaved (two real processes)."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier

runner = CliRunner(env={"COLUMNS": "200"})

#: Bad files of a long run and a word of the reason each must get in errors.csv.
BAD = {
    "missing.npy": "does not exist",
    "truncated.png": "truncated",
    "zero.nii.gz": "Empty file",
    "nan.npy": "NaN/Inf",
    "inf.npy": "NaN/Inf",
    "larger.npy": "has shape (20, 20)",
    "volume.npy": "is 3D",
    "four_d.nii.gz": "fourth axis is read as channels",
    "rgba.png": "3 channel(s)",
}
#: Unusual but good files: explained like any other.
ODD = ["constant.npy", "sp ace é.npy", "grey16.png"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Six good 16 x 16 images, the bad and odd files above, a manifest of the good images
    (``good.csv``), one of everything with the bad rows between the good ones
    (``long.csv``, with a repeated row) and a 2-class model."""
    root = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    good = []
    for i in range(6):
        np.save(root / f"g{i}.npy", rng.normal(0, 0.1, (16, 16)).astype(np.float32))
        good.append(f"g{i}.npy,{'ab'[i % 2]}")
    Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(root / "ok.png")
    png = (root / "ok.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "zero.nii.gz").write_bytes(b"")
    for name, bad in (("nan.npy", np.nan), ("inf.npy", np.inf)):
        array = rng.normal(0, 0.1, (16, 16)).astype(np.float32)
        array[3, 4] = bad
        np.save(root / name, array)
    np.save(root / "larger.npy", rng.normal(0, 0.1, (20, 20)).astype(np.float32))
    np.save(root / "volume.npy", rng.normal(0, 0.1, (8, 16, 16)).astype(np.float32))
    four_d = rng.normal(size=(16, 16, 8, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(four_d, np.eye(4)), root / "four_d.nii.gz")
    rgba = (rng.random((16, 16, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    np.save(root / "constant.npy", np.full((16, 16), 0.5, np.float32))
    np.save(root / "sp ace é.npy", rng.normal(0, 0.1, (16, 16)).astype(np.float32))
    grey16 = (rng.random((16, 16)) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(root / "grey16.png")
    (root / "good.csv").write_text("\n".join(["path,label", *good]) + "\n")
    rows = [good[0]]
    for i, name in enumerate([*BAD, *ODD]):
        rows += [f"{name},{'ab'[i % 2]}", good[1 + i % 5]] if i < 5 else [f"{name},a"]
    rows.append(good[0])  # an exact repeat: explained and counted once
    (root / "long.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    torch.manual_seed(0)
    net = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(root / "model.pt", net, extra={"class_names": ["a", "b"]})
    return root


def _explain(data: Path, manifest: str, out: Path):
    args = ["explain", "--model", str(data / "model.pt"), "--data", str(data / manifest)]
    return runner.invoke(app, [*args, "--method", "saliency", "--no-progress", "--out", str(out)])


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _maps(run: Path) -> dict[str, np.ndarray]:
    maps = {}
    for chunk in sorted((run / "chunks").glob("*.npz")):
        with np.load(chunk) as arrays:
            for path, array in zip(arrays["path"], arrays["maps"]):
                maps[Path(str(path)).name] = array
    return maps


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_long_run_records_each_bad_image_and_explains_the_rest(data, tmp_path):
    run, clean = tmp_path / "run", tmp_path / "clean"
    result = _explain(data, "long.csv", run)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "duplicate row" in result.output
    errors = {Path(row["path"]).name: row["reason"] for row in _table(run / "errors.csv")}
    assert errors.keys() == BAD.keys()
    for name, word in BAD.items():
        assert name in errors[name] and word in errors[name], (name, errors[name])
        assert "\n" not in errors[name]
    explained = {Path(row["path"]).name for row in _table(run / "items.csv")}
    assert explained == {f"g{i}.npy" for i in range(6)} | set(ODD)
    # the bad rows change nothing for the good ones: their maps equal a run without them
    assert _explain(data, "good.csv", clean).exit_code == 0
    reference, maps = _maps(clean), _maps(run)
    for name, expected in reference.items():
        np.testing.assert_array_equal(maps[name], expected)
    assert all(np.isfinite(maps[name]).all() for name in ODD)


def test_a_run_resumed_after_a_bad_file_is_fixed_loses_nothing(data, tmp_path):
    run = tmp_path / "run"
    assert _explain(data, "long.csv", run).exit_code == 0
    before = _digests(run / "chunks")
    again = _explain(data, "long.csv", run)
    assert again.exit_code == 0 and "(0 now, 9 error(s))" in " ".join(again.output.split())
    assert _digests(run / "chunks") == before
    np.save(data / "missing.npy", np.zeros((16, 16), np.float32))
    try:
        fixed = _explain(data, "long.csv", run)
    finally:
        (data / "missing.npy").unlink()
    assert fixed.exit_code == 0 and "(1 now, 8 error(s))" in " ".join(fixed.output.split())
    after = _digests(run / "chunks")
    assert {k: after[k] for k in before} == before, "a chunk already written was changed"
    assert "missing.npy" not in {Path(r["path"]).name for r in _table(run / "errors.csv")}


GATED_NET = '''
import os
import time

import torch


class GatedNet(torch.nn.Module):
    """A tiny CNN whose forward passes wait, once the run named by GATED_RUN exists (its
    run.json is written under the lock), until the file GATED_RELEASE appears: an explain
    that holds the run's lock exactly as long as the test needs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        run, release = os.environ.get("GATED_RUN"), os.environ.get("GATED_RELEASE")
        if run and os.path.exists(os.path.join(run, "run.json")):
            deadline = time.monotonic() + 120
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def gated_net():
    torch.manual_seed(0)
    return GatedNet()
'''


def _held(lock: Path) -> bool:
    """True when another process holds the run's flock."""
    if not lock.exists():
        return False
    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def test_a_second_process_on_a_run_being_explained_is_refused(data, tmp_path, monkeypatch):
    (tmp_path / "gatednet.py").write_text(GATED_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    from gatednet import gated_net

    torch.save(gated_net().state_dict(), tmp_path / "gated.pt")
    run, release = tmp_path / "run", tmp_path / "release"
    args = [
        "explain",
        *("--model", str(tmp_path / "gated.pt"), "--model-factory", "gatednet:gated_net"),
        *("--data", str(data / "good.csv"), "--method", "saliency", "--batch-size", "1"),
        *("--no-progress", "--out", str(run)),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
        "GATED_RUN": str(run),
        "GATED_RELEASE": str(release),
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "medexplain.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ((run / "run.json").exists() and _held(run / ".lock")):
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the first explain never took the lock"
            time.sleep(0.05)
        refused = {
            "explain": runner.invoke(app, args),
            "global": runner.invoke(app, ["global", str(run)]),
            "evaluate": runner.invoke(app, ["evaluate", str(run), "--no-progress"]),
        }
        release.touch()  # the first explain goes on
        output, _ = first.communicate(timeout=120)
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
    for command, result in refused.items():
        flat = " ".join(result.output.split())
        assert result.exit_code == 2, (command, result.output)
        assert "being written by another medexplain process" in flat, (command, flat)
    assert first.returncode == 0, output
    assert "done: 6 of 6 image(s) explained (6 now, 0 error(s))" in " ".join(output.split())
    assert len(_table(run / "items.csv")) == 6 and not _table(run / "errors.csv")
    assert not (run / "global").exists() and not (run / "evaluation.json").exists()
    keys = [
        key for chunk in sorted((run / "chunks").glob("*.npz")) for key in np.load(chunk)["key"]
    ]
    assert len(keys) == len(set(keys)) == 6, "an image was explained twice"
