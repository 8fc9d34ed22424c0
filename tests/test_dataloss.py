"""Nothing lost, nothing silently wrong: each awkward input a new user tried, as a test.

Every test hashes the user's input files before and after and asserts they are still there,
byte for byte, next to the corrected result.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.explain import create
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs import DamagedChunkError, ExplainSettings, RunStore, explain_run

runner = CliRunner()
SIZE = 16
N = 8


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (relative path -> digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _image(i: int, label: str) -> np.ndarray:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 60, (SIZE, SIZE)).astype(np.uint8)
    if label == "lesion":
        image[4:10, 3:9] += 150
    return image


@pytest.fixture
def ds(tmp_path) -> Path:
    """A user's dataset folder: 8 PNGs, a manifest with class names, a classifier checkpoint
    (two outputs) and a model config that orders the labels [lesion, healthy]."""
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    rows = ["path,label"]
    for i in range(N):
        label = "lesion" if i % 2 else "healthy"
        Image.fromarray(_image(i, label)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label}")
    (root / "good.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    net = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(root / "model.pt", net)
    (root / "model.yaml").write_text("labels: [lesion, healthy]\n")
    return root


def _explain_args(ds: Path, out: Path, *extra: str) -> list[str]:
    return [
        "explain",
        "--model",
        str(ds / "model.pt"),
        "--model-config",
        str(ds / "model.yaml"),
        "--data",
        str(ds / "good.csv"),
        "--method",
        "saliency",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _maps_by_path(run: Path) -> dict[str, np.ndarray]:
    out = {}
    for chunk in RunStore(run).iter_chunks():
        for j, path in enumerate(chunk.path.tolist()):
            assert path not in out, f"{path} stored twice"
            out[path] = chunk.maps[j]
    return out


# --------------------------------------------------------------------------- data loss


def test_out_equal_to_the_data_folder_is_refused_and_nothing_is_deleted(ds):
    before = _digests(ds)
    result = runner.invoke(app, _explain_args(ds, ds, "--overwrite"))
    assert result.exit_code == 2, result.output
    assert "not a medexplain run" in result.output or "contains the input" in result.output
    assert _digests(ds) == before
    assert not (ds / ".lock").exists() and not (ds / "run.json").exists()


def test_a_run_folder_containing_an_input_is_refused_even_when_it_is_a_run(ds, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, _explain_args(ds, run)).exit_code == 0
    # the user then puts the model inside the run folder and explains with it
    shutil.copy(ds / "model.pt", run / "model.pt")
    before = _digests(run)
    args = _explain_args(ds, run, "--overwrite")
    args[args.index("--model") + 1] = str(run / "model.pt")
    result = runner.invoke(app, [*args[:-2], "--method", "gradcam", "--overwrite"])
    assert result.exit_code == 2 and "contains the input" in result.output
    assert _digests(run) == before


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(ds, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    before = _digests(folder)
    for extra in ((), ("--overwrite",)):
        result = runner.invoke(app, _explain_args(ds, folder, *extra))
        assert result.exit_code == 2, result.output
        assert "not a medexplain run" in result.output
        assert "--overwrite" not in result.output  # never suggest a destructive flag here
        assert _digests(folder) == before


def test_overwrite_of_a_run_deletes_only_what_medexplain_wrote(ds, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, _explain_args(ds, run)).exit_code == 0
    (run / "notes.txt").write_text("my notes on this run")
    args = _explain_args(ds, run, "--overwrite")
    args[args.index("saliency")] = "input_x_gradient"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (run / "notes.txt").read_text() == "my notes on this run"
    assert RunStore(run).record()["settings"]["method"] == "input_x_gradient"
    assert RunStore(run).count() == N


@pytest.mark.slow
def test_evaluations_accumulate_and_the_report_shows_what_is_on_disk(ds, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, _explain_args(ds, run)).exit_code == 0
    args = ["evaluate", str(run), "--steps", "4", "--seeds", "2", "--no-progress"]
    assert runner.invoke(app, [*args, "--peppr"]).exit_code == 0
    peppr = json.loads((run / "evaluation.json").read_text())["peppr"]
    result = runner.invoke(app, [*args, "--deletion", "--n-deletion", "4"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["peppr"] == peppr  # kept, not overwritten
    assert evaluation["deletion"]["n_images"] == 4
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    page = (run / "report.html").read_text()
    assert f"{peppr['erase_area']:.3f}" in page


# --------------------------------------------------------------------------- labels


def test_the_model_configs_label_order_is_the_class_order(ds, tmp_path):
    before = _digests(ds)
    run = tmp_path / "run"
    result = runner.invoke(app, _explain_args(ds, run, "--target", "label"))
    assert result.exit_code == 0, result.output
    record = RunStore(run).record()
    assert record["class_names"] == ["lesion", "healthy"]
    with open(ds / "good.csv") as handle:
        names = {str(ds / r["path"]): r["label"] for r in csv.DictReader(handle)}
    for chunk in RunStore(run).iter_chunks():
        for j, path in enumerate(chunk.path.tolist()):
            expected = ["lesion", "healthy"].index(names[path])
            assert int(chunk.label[j]) == expected and int(chunk.target[j]) == expected
    assert _digests(ds) == before


def test_a_label_the_model_does_not_know_is_an_error_naming_it(ds, tmp_path):
    text = (ds / "good.csv").read_text().replace("img/3.png,lesion", "img/3.png,tumour")
    (ds / "odd.csv").write_text(text)
    args = _explain_args(ds, tmp_path / "run")
    args[args.index("--data") + 1] = str(ds / "odd.csv")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "tumour" in result.output
    assert "lesion" in result.output and "healthy" in result.output


# --------------------------------------------------------------------------- resume by key


def _settings(ds: Path, csv_name: str, **overrides) -> ExplainSettings:
    values = dict(
        data=str(ds / csv_name),
        method="saliency",
        model=str(ds / "model.pt"),
        model_config=str(ds / "model.yaml"),
        chunk_size=3,
        batch_size=2,
    )
    values.update(overrides)
    return ExplainSettings(**values)


def test_reordered_and_extended_manifest_resumes_to_a_fresh_runs_maps(ds, tmp_path):
    lines = (ds / "good.csv").read_text().splitlines()
    # the final manifest: the same rows reordered, then extended by four more images
    for i in range(N, N + 4):
        Image.fromarray(_image(i, "lesion")).save(ds / "img" / f"{i}.png")
    final = [lines[0], *reversed(lines[1:]), *[f"img/{i}.png,lesion" for i in range(N, N + 4)]]
    (ds / "final.csv").write_text("\n".join(final) + "\n")
    before = _digests(ds)
    quiet = {"progress": False, "log": lambda m: None}
    # one image per forward pass: then the maps cannot depend on which images shared a
    # batch (BLAS sums differ in the last bits with the batch's composition)
    run = tmp_path / "resumed"
    explain_run(_settings(ds, "final.csv", limit=4, batch_size=1), run, **quiet)
    summary = explain_run(_settings(ds, "final.csv", batch_size=1), run, **quiet)
    assert summary["n_done"] == N + 4 and summary["n_computed"] == N
    fresh = tmp_path / "fresh"
    explain_run(_settings(ds, "final.csv", batch_size=1), fresh, **quiet)
    resumed_maps, fresh_maps = _maps_by_path(run), _maps_by_path(fresh)
    assert set(resumed_maps) == set(fresh_maps) and len(fresh_maps) == N + 4
    assert max(np.abs(resumed_maps[p] - fresh_maps[p]).max() for p in fresh_maps) == 0
    with open(run / "items.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["index"] for r in rows] == [str(i) for i in range(N + 4)]
    assert [Path(r["path"]).name for r in rows] == [
        Path(line.split(",")[0]).name for line in final[1:]
    ]
    assert _digests(ds) == before
    # the case a user hit: a --limit 4 run, then the same manifest file reordered and
    # extended, then the same command without --limit
    shutil.copy(ds / "good.csv", ds / "manifest.csv")
    other = tmp_path / "other"
    explain_run(_settings(ds, "manifest.csv", limit=4), other, **quiet)
    shutil.copy(ds / "final.csv", ds / "manifest.csv")
    summary = explain_run(_settings(ds, "manifest.csv"), other, **quiet)
    assert summary["n_done"] == N + 4 and summary["n_computed"] == N
    with open(other / "items.csv") as handle:
        paths = [r["path"] for r in csv.DictReader(handle)]
    assert len(paths) == len(set(paths)) == N + 4


def test_a_shortened_manifest_shows_its_images_only_and_loses_no_computed_map(ds, tmp_path):
    quiet = {"progress": False, "log": lambda m: None}
    run = tmp_path / "run"
    explain_run(_settings(ds, "good.csv"), run, **quiet)
    short = explain_run(_settings(ds, "good.csv", limit=3), run, **quiet)
    assert short["n_done"] == 3 and short["n_computed"] == 0
    store = RunStore(run)
    assert store.count() == 3
    images = [np.asarray(Image.open(ds / "img" / f"{i}.png"), np.float64) for i in range(3)]
    np.testing.assert_allclose(store.mean_image()[0], np.mean(images, 0), atol=1e-9)
    again = explain_run(_settings(ds, "good.csv"), run, **quiet)
    assert again["n_done"] == N and again["n_computed"] == 0


def test_a_changed_file_is_explained_again(ds, tmp_path):
    quiet = {"progress": False, "log": lambda m: None}
    run = tmp_path / "run"
    explain_run(_settings(ds, "good.csv"), run, **quiet)
    Image.fromarray(255 - _image(2, "healthy")).save(ds / "img" / "2.png")
    os.utime(ds / "img" / "2.png", ns=(1, 1))
    summary = explain_run(_settings(ds, "good.csv"), run, **quiet)
    assert summary["n_computed"] == 1 and summary["n_done"] == N
    fresh = tmp_path / "fresh"
    explain_run(_settings(ds, "good.csv"), fresh, **quiet)
    a, b = _maps_by_path(run), _maps_by_path(fresh)
    assert set(a) == set(b) and all(np.array_equal(a[p], b[p]) for p in b)


def test_duplicate_rows_are_explained_and_counted_once(ds, tmp_path):
    lines = (ds / "good.csv").read_text().splitlines()
    (ds / "dup.csv").write_text("\n".join([*lines, lines[1], lines[2]]) + "\n")
    args = _explain_args(ds, tmp_path / "run")
    args[args.index("--data") + 1] = str(ds / "dup.csv")
    result = runner.invoke(app, [*args, "--global"])
    assert result.exit_code == 0, result.output
    assert "2 duplicate row(s)" in result.output
    index = json.loads((tmp_path / "run" / "global" / "index.json").read_text())
    counts = {tuple(g["key"]): g["count"] for g in index["groups"]}
    assert counts[("overall",)] == N
    assert counts[("label", "lesion")] == counts[("label", "healthy")] == N // 2


def test_options_out_of_range_are_refused(ds, tmp_path):
    for option, value in (("--limit", "-1"), ("--limit", "0"), ("--chunk-size", "0")):
        result = runner.invoke(app, [*_explain_args(ds, tmp_path / "r"), option, value])
        assert result.exit_code == 2 and option in result.output, (option, result.output)
    assert not (tmp_path / "r").exists()


def test_localization_without_masks_is_an_error_not_a_silent_success(ds, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, _explain_args(ds, run)).exit_code == 0
    result = runner.invoke(app, ["evaluate", str(run), "--localization", "--no-progress"])
    assert result.exit_code == 2 and "mask" in result.output


def test_relative_paths_are_stored_absolute(ds, tmp_path, monkeypatch):
    monkeypatch.chdir(ds)
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            "model.pt",
            "--model-config",
            "model.yaml",
            "--data",
            "good.csv",
            "--method",
            "saliency",
            "--out",
            str(run),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    settings = RunStore(run).record()["settings"]
    assert settings["model"] == str(ds / "model.pt")
    assert settings["model_config"] == str(ds / "model.yaml")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["evaluate", str(run), "--deletion", "--n-deletion", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output


def test_a_truncated_chunk_is_named_then_recomputed(ds, tmp_path):
    quiet = {"progress": False, "log": lambda m: None}
    run = tmp_path / "run"
    explain_run(_settings(ds, "good.csv"), run, **quiet)
    clean = _maps_by_path(run)
    chunk = RunStore(run).chunk_path(1)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    result = runner.invoke(app, ["global", str(run)])
    assert result.exit_code == 2 and "000001.npz" in result.output and "damaged" in result.output
    messages = []
    summary = explain_run(_settings(ds, "good.csv"), run, progress=False, log=messages.append)
    assert summary["n_computed"] == 3 and summary["n_done"] == N
    assert any("000001.npz" in m for m in messages)
    again = _maps_by_path(run)
    assert set(again) == set(clean) and all(np.array_equal(again[p], clean[p]) for p in clean)
    assert runner.invoke(app, ["global", str(run)]).exit_code == 0


def test_a_flipped_bit_in_a_chunk_fails_its_checksum(ds, tmp_path):
    run = tmp_path / "run"
    explain_run(_settings(ds, "good.csv"), run, progress=False, log=lambda m: None)
    store = RunStore(run)
    chunk = store.read_chunk(0)
    chunk.maps[0, 0, 0, 0] += 1.0  # written with the old digests: a silent corruption
    arrays = chunk.to_arrays()
    digests = json.loads(str(np.load(store.chunk_path(0))["digests"]))
    arrays["digests"] = np.asarray(json.dumps(digests))
    with open(store.chunk_path(0), "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(DamagedChunkError, match="checksum of 'maps'"):
        store.read_chunk(0)


# --------------------------------------------------------------------------- checkpoints


def test_a_learned_explainers_checkpoint_is_refused_for_another_classifier(ds, tmp_path):
    from medexplain.explain.generative.unet import UNet, UNetConfig
    from medexplain.models.external import load_model

    model_a = load_model(ds / "model.pt", config=ds / "model.yaml")
    generator = UNet(UNetConfig(in_channels=1, spatial_dims=2, widths=(4, 8)))
    explainer = create("similar_adversarial", model_a, generator=generator)
    explainer.save(tmp_path / "gen.pt")
    other = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # another classifier: other weights
    save_checkpoint(ds / "other.pt", other)
    before = _digests(ds)
    args = _explain_args(ds, tmp_path / "ok", "--explainer-checkpoint", str(tmp_path / "gen.pt"))
    args[args.index("saliency")] = "similar_adversarial"
    assert runner.invoke(app, args).exit_code == 0  # fitted for this classifier: accepted
    args[args.index("--out") + 1] = str(tmp_path / "other")
    args[args.index("--model") + 1] = str(ds / "other.pt")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "another classifier" in result.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert _digests(ds) == before


def test_a_warp_simulator_checkpoint_records_its_classifier(ds, tmp_path):
    from medexplain.explain.generative.warp_network import WarpSimulator, WarpSimulatorConfig
    from medexplain.models.fingerprint import ClassifierMismatchError, classifier_fingerprint

    torch.manual_seed(0)
    model_a = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    model_b = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    with torch.no_grad():
        next(model_b.parameters()).add_(0.01)
    simulator = WarpSimulator(WarpSimulatorConfig(spatial_dims=2, in_channels=1, num_classes=2))
    create("warp_simulator", model_a, simulator=simulator).save(tmp_path / "sim.pt")
    create("warp_simulator", model_a, checkpoint=tmp_path / "sim.pt")
    with pytest.raises(ClassifierMismatchError, match="another classifier"):
        create("warp_simulator", model_b, checkpoint=tmp_path / "sim.pt")
    # the fingerprint depends on the weights only, not on the module's names
    scripted = torch.jit.trace(model_a.eval(), torch.zeros(1, 1, SIZE, SIZE))
    assert classifier_fingerprint(scripted) == classifier_fingerprint(model_a)
    assert classifier_fingerprint(model_a) != classifier_fingerprint(model_b)
    # BatchNorm keeps a 0-dim step counter among its buffers: it is fingerprinted too
    with_bn = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="batch"))
    copy = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="batch"))
    copy.load_state_dict(with_bn.state_dict())
    assert classifier_fingerprint(copy) == classifier_fingerprint(with_bn)
    with torch.no_grad():
        copy.state_dict()["features.0.1.num_batches_tracked"].add_(1)
    assert classifier_fingerprint(copy) != classifier_fingerprint(with_bn)


# --------------------------------------------------------------------------- intensities


def test_a_16_bit_png_beside_8_bit_pngs_is_refused_by_name(ds, tmp_path):
    wide = (_image(5, "lesion").astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(ds / "img" / "5.png")
    before = _digests(ds)
    run = tmp_path / "run"
    result = runner.invoke(app, _explain_args(ds, run))
    assert result.exit_code == 0, result.output
    with open(run / "errors.csv") as handle:
        errors = list(csv.DictReader(handle))
    assert len(errors) == 1 and errors[0]["path"].endswith("5.png")
    assert "65535" in errors[0]["reason"] and "--normalise range" in errors[0]["reason"]
    # normalised by the stored type's range, the 16-bit image equals its 8-bit original
    result = runner.invoke(app, [*_explain_args(ds, tmp_path / "r2"), "--normalise", "range"])
    assert result.exit_code == 0 and RunStore(tmp_path / "r2").count() == N
    assert _digests(ds) == before


def test_check_alignment_reports_a_nan_volume_and_still_correlates_the_others(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 8, 8)).astype(np.float32)
    rows = ["path,label"]
    for i in range(6):
        volume = base + 0.1 * rng.normal(size=base.shape).astype(np.float32)
        if i == 3:
            volume[2, 2, 2] = np.nan
        np.save(tmp_path / f"v{i}.npy", volume[None])
        rows.append(f"v{i}.npy,{i % 2}")
    (tmp_path / "vols.csv").write_text("\n".join(rows) + "\n")
    before = _digests(tmp_path)
    out = tmp_path / "alignment"
    result = runner.invoke(
        app, ["check-alignment", "--data", str(tmp_path / "vols.csv"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "1 unreadable" in result.output
    with open(next(out.glob("*.csv"))) as handle:
        rows_out = list(csv.DictReader(handle))
    by_name = {Path(r["path"]).name: r for r in rows_out}
    assert "NaN" in " ".join(by_name["v3.npy"].values())
    assert all(float(by_name[f"v{i}.npy"]["correlation"]) > 0.9 for i in (0, 1, 2, 4, 5))
    assert {k: v for k, v in _digests(tmp_path).items() if not k.startswith("alignment")} == before
