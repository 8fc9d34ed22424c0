"""Resumable runs: SIGKILL at random points and resume gives exactly the clean run's maps and
global maps (3D NIfTI, as the issue asks); corrupt files go to errors.csv; changed settings
are refused; the store's chunks are atomic and never double-count an image."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medexplain.data.synthetic import make_benchmark
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs import (
    Chunk,
    ExplainSettings,
    RunError,
    RunStore,
    accumulate,
    explain_run,
    global_run,
)

N_IMAGES = 24
AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, 5], [0, 0, 2.0, 3], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def nifti_data(tmp_path_factory):
    """24 volumes 16^3 from the benchmark in class folders, one corrupt file, and an
    untrained 3D classifier saved as a medexplain checkpoint."""
    root = tmp_path_factory.mktemp("nifti")
    bench = make_benchmark(N_IMAGES, dims=3, size=16, seed=0)
    for i in range(N_IMAGES):
        folder = root / "data" / bench.class_names[int(bench.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(bench.images[i, 0].numpy(), AFFINE), str(folder / f"s{i:03d}.nii.gz")
        )
    (root / "data" / "lesion" / "broken.nii.gz").write_bytes(b"not a nifti file")
    net = build_classifier(CNNConfig(spatial_dims=3, num_classes=3, widths=(4, 8)))
    save_checkpoint(root / "model.pt", net, extra={"class_names": sorted(bench.class_names)})
    return root


def _settings(root: Path, **overrides) -> ExplainSettings:
    values = dict(
        data=str(root / "data"),
        method="saliency",
        model=str(root / "model.pt"),
        params={},
        chunk_size=1,
        batch_size=2,
    )
    values.update(overrides)
    return ExplainSettings(**values)


def _all_maps(run: Path) -> tuple[np.ndarray, np.ndarray]:
    store = RunStore(run)
    chunks = list(store.iter_chunks())
    return np.concatenate([c.index for c in chunks]), np.concatenate([c.maps for c in chunks])


@pytest.fixture(scope="module")
def clean_run(nifti_data):
    out = nifti_data / "clean"
    summary = explain_run(_settings(nifti_data), out, progress=False, log=lambda m: None)
    return out, summary


def test_corrupt_file_is_recorded_and_the_rest_is_done(nifti_data, clean_run):
    out, summary = clean_run
    assert summary["n_images"] == N_IMAGES + 1
    assert summary["n_done"] == N_IMAGES and summary["n_errors"] == 1
    with open(out / "errors.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["path"].endswith("broken.nii.gz")
    assert "broken.nii.gz" in rows[0]["reason"]
    index, _ = _all_maps(out)
    assert sorted(index.tolist()) == [i for i in range(N_IMAGES + 1) if i != int(rows[0]["index"])]
    # the stored maps are the explainer's maps of the files as read (independent recompute)
    from medexplain.data.files import open_dataset
    from medexplain.explain import create
    from medexplain.models.external import load_model

    model = load_model(nifti_data / "model.pt")
    dataset = open_dataset(nifti_data / "data")
    store = RunStore(out)
    chunk = store.read_chunk(3)
    x = torch.stack([dataset[int(i)]["image"] for i in chunk.index])
    expected = create("saliency", model)(x, torch.from_numpy(chunk.target))
    np.testing.assert_allclose(chunk.maps, expected.numpy(), atol=1e-6)
    assert (chunk.target == model(x).argmax(1).numpy()).all()
    np.testing.assert_allclose(chunk.affine[0], AFFINE)


def test_resume_is_free_and_changed_settings_are_refused(nifti_data, clean_run):
    out, _ = clean_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir()}
    again = explain_run(_settings(nifti_data), out, progress=False, log=lambda m: None)
    assert again["n_computed"] == 0 and again["n_done"] == N_IMAGES
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir()}
    with pytest.raises(RunError, match="params"):
        explain_run(_settings(nifti_data, params={"abs": False}), out, progress=False)
    with pytest.raises(RunError, match="method"):
        explain_run(_settings(nifti_data, method="gradcam"), out, progress=False)


@pytest.mark.slow
def test_sigkill_twice_then_resume_equals_clean_run(nifti_data, clean_run):
    """The issue's acceptance test: a 3D NIfTI run killed twice with SIGKILL at random
    points and resumed gives the clean run's maps and global maps (max abs diff < 1e-6),
    with no image counted twice."""
    clean, _ = clean_run
    out = nifti_data / "killed"
    command = [
        sys.executable, "-m", "medexplain.cli", "explain",
        "--model", str(nifti_data / "model.pt"), "--data", str(nifti_data / "data"),
        "--method", "saliency",
        "--chunk-size", "1", "--batch-size", "2", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    rng = random.Random(8)
    interrupted = 0
    total_chunks = N_IMAGES + 1
    for _ in range(2):
        start_count = len(RunStore(out).chunk_numbers())
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # wait until this process has written a chunk, then kill after a random short delay
        while time.monotonic() < deadline and process.poll() is None:
            if len(RunStore(out).chunk_numbers()) > start_count:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        interrupted += len(RunStore(out).chunk_numbers()) < total_chunks
    assert interrupted >= 1, "the kills came too late to interrupt the run"
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert not any(p.name.endswith(".tmp") for p in (out / "chunks").iterdir())

    index_clean, maps_clean = _all_maps(clean)
    index_killed, maps_killed = _all_maps(out)
    assert len(set(index_killed.tolist())) == len(index_killed) == N_IMAGES
    assert (index_clean == index_killed).all()
    assert np.abs(maps_clean - maps_killed).max() < 1e-6
    a = global_run(clean, by="label", log=lambda m: None)
    b = global_run(out, by="label", log=lambda m: None)
    assert a.counts == b.counts and a.overall.count == N_IMAGES
    for key in a.groups:
        assert (a.groups[key].mean - b.groups[key].mean).abs().max() < 1e-6
        assert (a.groups[key].std - b.groups[key].std).abs().max() < 1e-6
    # 3D global maps are written as NIfTI with the scans' affine
    image = nib.load(str(out / "global" / "overall_mean.nii.gz"))
    np.testing.assert_allclose(image.affine, AFFINE)
    np.testing.assert_allclose(image.get_fdata(), b.overall.mean[0].numpy(), atol=1e-6)


def test_global_from_store_equals_one_pass_over_all_maps(nifti_data, clean_run):
    """Streaming chunk by chunk equals one update with every map (GlobalMaps is a monoid)."""
    from medexplain.globalmaps import GlobalMaps

    out, _ = clean_run
    store = RunStore(out)
    record = store.record()
    streamed = accumulate(store, record, ("label",), "max", "abs").result()
    chunks = list(store.iter_chunks())
    one = GlobalMaps(record["spatial_shape"], record["class_names"], "max", "abs", kinds=("label",))
    one.update(
        torch.from_numpy(np.concatenate([c.maps for c in chunks])),
        torch.from_numpy(np.concatenate([c.label for c in chunks])),
    )
    expected = one.result()
    for key, group in expected.groups.items():
        assert streamed.groups[key].count == group.count
        assert (streamed.groups[key].mean - group.mean).abs().max() < 1e-12
    # the mean image kept in the chunks is the mean of the explained images
    from medexplain.data.files import open_dataset

    dataset = open_dataset(nifti_data / "data")
    images = torch.stack([dataset[int(i)]["image"] for c in chunks for i in c.index])
    np.testing.assert_allclose(store.mean_image(), images.double().mean(0).numpy(), atol=1e-10)


def test_chunk_write_is_atomic_and_round_trips(tmp_path):
    store = RunStore(tmp_path / "run")

    def chunk(indices, errors=()):
        n = len(indices)
        return Chunk(
            number=0,
            index=np.asarray(indices),
            maps=np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2) + indices[0],
            label=np.zeros(n, np.int64),
            pred=np.zeros(n, np.int64),
            target=np.zeros(n, np.int64),
            logits=np.zeros((n, 2), np.float32),
            affine=np.full((n, 4, 4), np.nan),
            path=np.asarray([f"f{i}" for i in indices]),
            key=np.asarray([f"k{i}" for i in indices]),
            image_sum=np.ones((1, 2, 2)) * n,
            image_count=n,
            errors=list(errors),
        )

    first = chunk([0, 2], errors=[(1, "f1", "corrupt", "k1")])
    store.write_chunk(first)
    # a writer killed mid-write leaves only a temporary file, never a half chunk
    (store.chunk_dir / ".000001.npz.123.abcd.tmp").write_bytes(b"partial")
    assert store.chunk_numbers() == [0]
    assert store.remove_partial() == 1
    back = store.read_chunk(0)
    assert back.finished == {"k0", "k1", "k2"}
    np.testing.assert_array_equal(back.maps, first.maps)
    assert store.errors() == [(1, "f1", "corrupt")]
    # a selection restricts every view and renumbers by the current manifest rows
    store.write_selection(["k2", "k1"], [0, 1])
    view = next(iter(store.iter_chunks()))
    assert view.key.tolist() == ["k2"] and view.index.tolist() == [0]
    np.testing.assert_array_equal(view.maps[0], first.maps[1])
    assert view.image_sum is None  # a partial chunk's sum cannot be split
    assert store.errors() == [(1, "f1", "corrupt")]


def test_existing_foreign_folder_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a medexplain run"):
        RunStore(tmp_path / "x").initialise({}, {"a": 1})
    with pytest.raises(RunError, match=r"no run\.json"):
        RunStore(tmp_path / "x").record()


def test_second_writer_is_refused(tmp_path):
    store = RunStore(tmp_path / "run")
    with (
        store.lock(),
        pytest.raises(RunError, match="another medexplain process"),
        RunStore(tmp_path / "run").lock(),
    ):
        pass


if os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip("SIGKILL and flock need POSIX")
