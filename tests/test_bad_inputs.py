"""Bad command-line input ends in a message naming the option and what was expected, exit
code 2, no traceback, and nothing written or changed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Eight 16 x 16 images of classes a and b, their manifest, a 2-class model and a file
    where a folder is expected."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    (root / "data").mkdir()
    for i in range(8):
        np.save(root / "data" / f"i{i}.npy", rng.normal(0, 0.1, (16, 16)).astype(np.float32))
        rows.append(f"data/i{i}.npy,{'ab'[i % 2]}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    net = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(root / "model.pt", net, extra={"class_names": ["a", "b"]})
    (root / "afile").write_text("not a folder")
    return root


def _digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


EXPLAIN = ["explain", "--model", "{root}/model.pt", "--data", "{root}/data.csv", "--no-progress"]
SAG = ["sag", "--model", "{root}/model.pt", "--image", "{root}/data/i0.npy"]
FIT = ["fit", "similar-adversarial", "--model", "{root}/model.pt", "--data", "{root}/data.csv"]

#: (case, arguments, fragments the message must hold)
CASES = [
    (
        "param not a number",
        [*EXPLAIN, "--method", "integrated_gradients", "--param", "n_steps=abc", "--out", "{o}"],
        ["--method integrated_gradients", "n_steps", "'abc'"],
    ),
    (
        "param negative",
        [*EXPLAIN, "--method", "integrated_gradients", "--param", "n_steps=-1", "--out", "{o}"],
        ["n_steps", "positive", "-1"],
    ),
    (
        "device unknown",
        [*EXPLAIN, "--method", "saliency", "--device", "bogus", "--out", "{o}"],
        ["bogus", "cpu", "cuda"],
    ),
    (
        "out is a file",
        [*EXPLAIN, "--method", "saliency", "--out", "{root}/afile"],
        ["--out", "afile", "is a file"],
    ),
    (
        "out below a file",
        [*EXPLAIN, "--method", "saliency", "--out", "{root}/afile/sub"],
        ["--out", "lies below", "is a file"],
    ),
    (
        "learned explainer without checkpoint",
        [*EXPLAIN, "--method", "similar_adversarial", "--out", "{o}"],
        ["similar_adversarial", "--explainer-checkpoint"],
    ),
    ("sag grid 0", [*SAG, "--grid", "0", "--out", "{o}"], ["--grid", "Invalid value"]),
    (
        "sag grid finer than the image",
        [*SAG, "--grid", "100", "--out", "{o}"],
        ["--grid", "finer than the image (16, 16)"],
    ),
    (
        "sag target out of range",
        [*SAG, "--target", "99", "--out", "{o}"],
        ["--target", "99", "2 output(s)"],
    ),
    ("sag unknown param", [*SAG, "--param", "bogus=1", "--out", "{o}"], ["--param", "bogus"]),
    (
        "fit negative time",
        [*FIT, "--max-seconds", "-5", "--out", "{o}.pt"],
        ["--max-seconds", "Invalid value"],
    ),
]


@pytest.mark.parametrize("case, args, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_nothing_is_touched(
    inputs, tmp_path, case, args, fragments
):
    before = _digests(inputs)
    out = tmp_path / "out"
    argv = [a.format(root=inputs, o=out) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    flat = " ".join(result.output.replace("│", " ").split())
    for fragment in fragments:
        assert fragment in flat, (fragment, result.output)
    assert _digests(inputs) == before
    assert not (out / "run.json").exists() and not (out / "sag.json").exists()
    assert not out.with_suffix(".pt").exists()


def test_cuda_device_without_a_gpu_is_refused(inputs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = [a.format(root=inputs) for a in EXPLAIN]
    result = runner.invoke(
        app, [*argv, "--method", "saliency", "--device", "cuda:0", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "no CUDA device" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
