"""The command line: help on every command, explain -> global (--contrast) -> evaluate ->
report on a small 2D dataset, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.globalmaps import GlobalMaps
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs import RunStore

runner = CliRunner()
COMMANDS = [
    ["demo"],
    ["methods"],
    ["explain"],
    ["global"],
    ["evaluate"],
    ["report"],
    ["check-alignment"],
    ["fit", "similar-adversarial"],
    ["fit", "warp-simulator"],
    ["sag"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    if command[0] not in ("demo", "methods"):
        assert "Example: medexplain" in result.output


@pytest.fixture(scope="module")
def npy_data(tmp_path_factory):
    """16 images 16x16 as .npy in two class folders (class b brighter on the left), a
    CSV with masks for localization, and a tiny 2D classifier checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    rows = ["path,label,mask"]
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:8] = 1
    np.save(root / "mask.npy", mask)
    for i in range(16):
        label = "a" if i % 2 == 0 else "b"
        image = rng.normal(0, 0.1, (16, 16)).astype(np.float32)
        if label == "b":
            image[4:12, 2:8] += 1.0
        (root / "data" / label).mkdir(parents=True, exist_ok=True)
        np.save(root / "data" / label / f"i{i:02d}.npy", image)
        rows.append(f"data/{label}/i{i:02d}.npy,{label},mask.npy")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    net = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(root / "model.pt", net, extra={"class_names": ["a", "b"]})
    return root


@pytest.fixture(scope="module")
def explained(npy_data):
    out = npy_data / "run"
    args = ["explain", "--model", str(npy_data / "model.pt"), "--data", str(npy_data / "data.csv")]
    args += ["--method", "saliency", "--out", str(out), "--chunk-size", "5", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, args


def test_global_contrast_equals_globalresult_contrast(explained):
    out, _ = explained
    result = runner.invoke(app, ["global", str(out), "--by", "label", "--contrast", "b:a"])
    assert result.exit_code == 0, result.output
    store = RunStore(out)
    chunks = list(store.iter_chunks())
    maps = torch.from_numpy(np.concatenate([c.maps for c in chunks]))
    labels = torch.from_numpy(np.concatenate([c.label for c in chunks]))
    reference = GlobalMaps((16, 16), ["a", "b"], "max", "abs", kinds=("label",))
    expected = reference.update(maps, labels).result().contrast(("label", "b"), ("label", "a"))
    for name in ("t", "q"):
        saved = np.load(out / "global" / f"contrast_b_vs_a_{name}.npy")
        np.testing.assert_allclose(saved, getattr(expected, name)[0].numpy(), atol=1e-12)
    # the saved label maps are the per-label means of the normalised stored maps
    mean_b = np.load(out / "global" / "label__b_mean.npy")
    sel = maps[labels == 1].abs()
    sel = sel / sel.flatten(1).amax(1).view(-1, 1, 1, 1)
    np.testing.assert_allclose(mean_b, sel.double().mean(0)[0].numpy(), atol=1e-6)
    assert (out / "figures" / "global_label.png").is_file()
    assert (out / "figures" / "contrast_b_vs_a.png").is_file()


def test_evaluate_and_report(explained):
    out, _ = explained
    args = [
        "evaluate",
        str(out),
        "--steps",
        "4",
        "--seeds",
        "2",
        "--n-sanity",
        "2",
        "--n-deletion",
        "4",
    ]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["peppr"]["n_images"] == 16
    deletion = evaluation["deletion"]
    assert deletion["n_images"] == 4
    # the area is linear in the curve: the area of the mean curve is the mean of the areas
    for name in ("deletion", "insertion"):
        area = np.trapezoid(deletion[f"{name}_curve"], deletion["fractions"])
        assert area == pytest.approx(deletion[f"{name}_auc"], abs=1e-5)
    assert deletion["fractions"][0] == 0 and deletion["fractions"][-1] == pytest.approx(1)
    # localization: the stored maps scored against the CSV's masks (independent recompute)
    from medexplain.metrics.localization import localization_scores

    store = RunStore(out)
    maps = torch.from_numpy(np.concatenate([c.maps for c in store.iter_chunks()]))
    mask = torch.from_numpy(np.load(out.parent / "mask.npy") > 0).expand(16, 1, 16, 16)
    expected = localization_scores(maps, mask)["auroc"].mean().item()
    assert evaluation["localization"]["auroc"] == pytest.approx(expected, abs=1e-9)
    assert "rank_correlation_fully_randomized" in evaluation["sanity"]
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "data:image/png;base64" in page and "PEPPR" in page
    figure = base64.b64encode((out / "figures" / "deletion.png").read_bytes()).decode()
    assert figure in page  # the deletion/insertion curves are in the report


def test_changed_settings_are_refused_with_exit_2(explained):
    _, args = explained
    result = runner.invoke(app, [*args[:-1], "--target", "label", "--no-progress"])
    assert result.exit_code == 2
    assert "different settings" in result.output and "target" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, expected",
    [
        (["explain", "--data", "nowhere.csv", "--method", "saliency", "--out", "x"], "nowhere"),
        (["global", "not_a_run"], "not_a_run"),
        (["report", "not_a_run"], "no run.json"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, expected, tmp_path, monkeypatch, npy_data):
    monkeypatch.chdir(tmp_path)
    if args[0] == "explain":
        args = [*args, "--model", str(npy_data / "model.pt")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_bad_model_file_names_it(npy_data, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage")
    args = ["explain", "--model", str(bad), "--data", str(npy_data / "data.csv")]
    result = runner.invoke(app, [*args, "--method", "saliency", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and str(bad) in result.output.replace("\n", "")


def test_check_alignment_writes_csv_and_png(npy_data, tmp_path):
    out = tmp_path / "align"
    result = runner.invoke(
        app, ["check-alignment", "--data", str(npy_data / "data.csv"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "flagged" in result.output
    assert (out / "alignment.csv").is_file() and (out / "alignment.png").is_file()
    summary = json.loads((out / "alignment.json").read_text())
    assert summary["n_images"] == 16
