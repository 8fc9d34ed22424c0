"""The Ray engine on a local Ray this module starts (2 CPUs, actors with 1 torch thread):
the run it writes equals the local engine's (maps, items.csv, errors.csv, global maps, the
global maps also against a NumPy computation from the maps), and so does an evaluation
whose forward passes run on the actors; a SIGKILLed worker and a SIGKILLed driver both end
in the same run with every image once and finished chunks left untouched; ``--engine ray``
without Ray says how to install it."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from medexplain.cli import app  # noqa: E402
from medexplain.models.checkpoint import save_checkpoint  # noqa: E402
from medexplain.models.cnn import CNNConfig, build_classifier  # noqa: E402
from medexplain.runs import (  # noqa: E402
    ExplainSettings,
    RunError,
    RunStore,
    evaluate_run,
    explain_run,
    global_run,
)
from medexplain.runs.ray_engine import (  # noqa: E402
    RayEngine,
    RayOptions,
    ray_accumulator,
    ray_forward,
)

# One worker of `pytest -n 2 --dist loadgroup` runs this module: one Ray, started once.
pytestmark = pytest.mark.xdist_group("ray")

N_IMAGES = 24
METHOD, PARAMS = "integrated_gradients", {"n_steps": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 images 16x16 (.npy, two classes, class b brighter on the left), one unreadable
    file, a CSV manifest and an untrained 2D classifier."""
    root = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(N_IMAGES):
        label = "a" if i % 2 == 0 else "b"
        image = rng.normal(0, 0.3, (16, 16)).astype(np.float32)
        if label == "b":
            image[4:12, 2:8] += 1.0
        (root / "data" / label).mkdir(parents=True, exist_ok=True)
        np.save(root / "data" / label / f"i{i:02d}.npy", image)
        rows.append(f"data/{label}/i{i:02d}.npy,{label}")
    (root / "data" / "b" / "broken.npy").write_bytes(b"not an array")
    rows.insert(8, "data/b/broken.npy,b")  # manifest row 7
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    net = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(root / "model.pt", net, extra={"class_names": ["a", "b"]})
    return root


def _settings(root: Path, chunk_size: int = 3) -> ExplainSettings:
    return ExplainSettings(
        data=str(root / "data.csv"),
        method=METHOD,
        model=str(root / "model.pt"),
        params=dict(PARAMS),
        chunk_size=chunk_size,
        batch_size=3,
    )


@pytest.fixture(scope="module")
def cluster():
    """A local Ray with 2 CPUs for this module; its address for driver subprocesses."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(data):
    out = data / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = explain_run(_settings(data), out, progress=False, log=lambda m: None)
        result = global_run(out, by="label", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return out, summary, result


@pytest.fixture(scope="module")
def ray_run(data, cluster):
    out = data / "ray"
    engine = RayEngine(RayOptions(workers=2))
    summary = explain_run(_settings(data), out, progress=False, log=lambda m: None, engine=engine)
    accumulator = ray_accumulator(RayOptions(workers=2))
    result = global_run(out, by="label", log=lambda m: None, accumulator=accumulator)
    return out, summary, result, engine


def _maps_by_index(run: Path) -> dict[int, np.ndarray]:
    return {
        int(i): chunk.maps[j]
        for chunk in RunStore(run).iter_chunks()
        for j, i in enumerate(chunk.index.tolist())
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _check_same_maps(run: Path, reference: Path) -> None:
    """Every image once in ``run`` (chunk files hold each key at most once) and the same
    maps as ``reference``."""
    store = RunStore(run)
    keys = [k for c in store.iter_chunks(maps=False, selected=False) for k in c.key.tolist()]
    assert len(keys) == len(set(keys)) == N_IMAGES
    assert not list(store.chunk_dir.glob("*.tmp"))
    indices = [int(r["index"]) for r in _rows(run / "items.csv")]
    assert sorted(indices) == indices and len(set(indices)) == N_IMAGES
    got, want = _maps_by_index(run), _maps_by_index(reference)
    assert sorted(got) == sorted(want) == indices
    gap = max(float(np.abs(got[i] - want[i]).max()) for i in want)
    assert gap <= 1e-6


def test_ray_run_equals_local_run(ray_run, local_run):
    out, summary, result, engine = ray_run
    local_out, local_summary, local_result = local_run
    assert len(set(engine.pids)) == 2 and os.getpid() not in engine.pids
    for key in ("n_images", "n_done", "n_errors", "n_computed"):
        assert summary[key] == local_summary[key]
    _check_same_maps(out, local_out)
    ours, theirs = _rows(out / "items.csv"), _rows(local_out / "items.csv")
    assert len(ours) == len(theirs) == N_IMAGES
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if k != "logits"} == {
            k: v for k, v in b.items() if k != "logits"
        }
        np.testing.assert_allclose(
            np.array(a["logits"].split(), float), np.array(b["logits"].split(), float), atol=1e-6
        )
    # global maps merged from per-worker accumulators = the local one-pass stream
    assert result.counts == local_result.counts
    arrays, local_arrays = result.to_arrays(), local_result.to_arrays()
    assert arrays.keys() == local_arrays.keys()
    for name, array in local_arrays.items():
        np.testing.assert_allclose(arrays[name], array, atol=1e-6, rtol=0)


def test_ray_global_maps_match_numpy_from_the_maps(ray_run):
    """Independent reference: normalise each |map| by its maximum and average per label."""
    out, _, result, _ = ray_run
    maps = _maps_by_index(out)
    labels = {int(r["index"]): r["label"] for r in _rows(out / "items.csv")}
    for label, name in enumerate(("a", "b")):
        chosen = [np.abs(maps[i]) / np.abs(maps[i]).max() for i in maps if labels[i] == str(label)]
        assert len(chosen) == N_IMAGES // 2
        np.testing.assert_allclose(
            result.group(("label", name)).mean.numpy(), np.mean(chosen, axis=0), atol=1e-6
        )
        var = np.var(chosen, axis=0, ddof=1)
        np.testing.assert_allclose(result.group(("label", name)).var.numpy(), var, atol=1e-6)


@pytest.mark.slow
def test_evaluate_with_forward_passes_on_ray_equals_local_evaluate(ray_run):
    """PEPPR and deletion/insertion with the model's passes split over 2 actors give the
    local evaluation's numbers."""
    out = ray_run[0]
    options = dict(localization=False, sanity=False, peppr_steps=5, peppr_seeds=2, n_deletion=6)
    local = evaluate_run(out, progress=False, batch_size=8, **options)
    made = []
    make = ray_forward(RayOptions(workers=2))

    def forward(model, settings):
        made.append(make(model, settings))
        return made[-1]

    spread = evaluate_run(out, progress=False, batch_size=8, forward=forward, **options)
    assert made and made[0].calls > 0
    for section in ("peppr", "deletion"):
        ours, theirs = spread[section], local[section]
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, float):
                assert abs(ours[key] - value) <= 1e-6, (section, key)
            else:
                assert ours[key] == value, (section, key)


def test_bad_image_goes_to_errors_csv_not_to_a_crashed_worker(ray_run, data):
    out, summary, _, _ = ray_run
    errors = _rows(out / "errors.csv")
    assert [(e["index"], e["path"]) for e in errors] == [
        ("7", str(data / "data" / "b" / "broken.npy"))
    ]
    assert errors[0]["reason"]
    assert summary["n_done"] == N_IMAGES and summary["n_errors"] == 1


@pytest.mark.slow
def test_worker_killed_mid_run_finishes_with_every_image_once(data, cluster, local_run):
    """SIGKILL one actor's process once the first chunk is on disk: Ray restarts it and
    retries its chunks; the run equals the local one."""
    out = data / "ray_killed"
    engine = RayEngine(RayOptions(workers=2, in_flight=3))
    settings = _settings(data, chunk_size=2)
    n_chunks = -(-(N_IMAGES + 1) // 2)
    killed: dict[str, int] = {}

    def kill_one() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = list((out / "chunks").glob("*.npz")) if (out / "chunks").is_dir() else []
            if engine.pids and done:
                os.kill(engine.pids[0], signal.SIGKILL)
                killed.update(pid=engine.pids[0], chunks_at_kill=len(done))
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_one)
    watcher.start()
    summary = explain_run(settings, out, progress=False, log=lambda m: None, engine=engine)
    watcher.join()
    assert killed and killed["chunks_at_kill"] < n_chunks  # killed mid-run
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    assert summary["n_done"] == N_IMAGES and summary["n_errors"] == 1
    assert len(RunStore(out).chunk_numbers()) == n_chunks
    _check_same_maps(out, local_run[0])


@pytest.mark.slow
def test_driver_killed_and_rerun_resumes_without_recomputing(data, cluster, local_run):
    """The CLI driver (joining the module's Ray by address) is SIGKILLed after its first
    chunk; the same command again leaves the finished chunk files untouched and explains
    only the rest."""
    out = data / "ray_driver"
    command = [sys.executable, "-m", "medexplain.cli", "explain", "--data", str(data / "data.csv")]
    command += ["--model", str(data / "model.pt"), "--method", METHOD, "--out", str(out)]
    command += ["--param", f"n_steps={PARAMS['n_steps']}", "--chunk-size", "2"]
    command += ["--batch-size", "3", "--no-progress", "--engine", "ray", "--address", cluster]
    command += ["--workers", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            if (out / "chunks").is_dir() and list((out / "chunks").glob("*.npz")):
                break
            time.sleep(0.005)
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    time.sleep(3)  # Ray ends the dead driver's actors
    before = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "chunks").glob("*.npz")
    }
    chunks = list(RunStore(out).iter_chunks(maps=False, selected=False))
    explained_before = sum(len(c) for c in chunks)
    assert 0 < sum(len(c) + len(c.errors) for c in chunks) < N_IMAGES + 1  # killed mid-way
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    after = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "chunks").glob("*.npz")
    }
    assert {name: after[name] for name in before} == before  # finished chunks not rewritten
    now = int(re.search(r"\((\d+) now", again.stderr).group(1))
    assert now == N_IMAGES - explained_before
    _check_same_maps(out, local_run[0])


def test_a_superseded_driver_s_worker_writes_no_chunk(local_run, data):
    """A worker whose driver no longer owns the run (another token in run.json) refuses to
    write; under its own driver's token it writes the chunk."""
    from medexplain.runs.ray_engine import DRIVER, _ChunkActor

    store = RunStore(local_run[0])
    key, row = next(iter(store.selection().items()))
    store.update_record(**{DRIVER: "new"})
    worker = _ChunkActor(_settings(data), str(store.root), ((16, 16), 2), 1, "old")
    with pytest.raises(RunError, match="another driver"):
        worker.explain_chunk(999, [(key, row)])
    assert not store.chunk_path(999).exists()
    worker = _ChunkActor(_settings(data), str(store.root), ((16, 16), 2), 1, "new")
    assert worker.explain_chunk(999, [(key, row)])[:2] == (999, 1)
    assert store.read_chunk(999).key.tolist() == [key]
    store.chunk_path(999).unlink()  # the module's local run stays as it was


def test_engine_ray_without_ray_says_how_to_install(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = ["explain", "--data", str(data / "data.csv"), "--model", str(data / "model.pt")]
    args += ["--method", "saliency", "--out", str(tmp_path / "run"), "--engine", "ray"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "pip install 'medexplain[ray]'" in result.output
    assert not (tmp_path / "run").exists()


def test_ray_options_without_engine_ray_are_refused(data, tmp_path):
    args = ["explain", "--data", str(data / "data.csv"), "--model", str(data / "model.pt")]
    args += ["--method", "saliency", "--out", str(tmp_path / "run"), "--workers", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--engine ray" in result.output


def test_local_engine_and_the_cli_do_not_import_ray():
    code = (
        "import sys, medexplain.cli.run_commands, medexplain.runs.ray_engine, medexplain.runs; "
        "print('ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
