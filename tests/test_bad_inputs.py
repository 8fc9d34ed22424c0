"""Bad command-line input ends in a message naming the option or file and what was
expected, exit code 2, no traceback, and nothing written or changed: neither the inputs nor
a run already computed."""

from __future__ import annotations

import hashlib
import shutil
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs.store import RunStore

runner = CliRunner(env={"COLUMNS": "200"})


def _scripted_net() -> torch.jit.ScriptModule:
    """A TorchScript CNN as third parties ship them: conv, ReLU, conv, ReLU, pool, linear."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scripting is what users have
        return torch.jit.script(net.eval())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Eight 16 x 16 images of classes a and b, their manifest, a 2-class model (checkpoint,
    TorchScript, state dict, pickled whole), broken manifests and model files, a file where
    a folder is expected, a run explained with saliency and a run killed before its first
    chunk."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    (root / "data").mkdir()
    for i in range(8):
        np.save(root / "data" / f"i{i}.npy", rng.normal(0, 0.1, (16, 16)).astype(np.float32))
        rows.append(f"data/i{i}.npy,{'ab'[i % 2]}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    np.save(root / "vol.npy", rng.normal(0, 0.1, (8, 16, 16)).astype(np.float32))
    net = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(root / "model.pt", net, extra={"class_names": ["a", "b"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(_scripted_net(), root / "model.ts")
    torch.save(net.state_dict(), root / "state.pt")
    torch.save({"foo.weight": torch.zeros(3)}, root / "wrongkeys.pt")
    torch.save(net, root / "whole.pt")
    (root / "afile").write_text("not a folder")
    (root / "empty.csv").write_text("")
    (root / "noheader.csv").write_text("\n".join(rows[1:]) + "\n")
    (root / "conflict.csv").write_text("\n".join([*rows, "data/i0.npy,b"]) + "\n")
    (root / "unreadable.csv").write_text("path,label\ndata/none0.npy,a\ndata/none1.npy,b\n")
    (root / "mixed.csv").write_text("path,label\nvol.npy,a\n" + "\n".join(rows[1:]) + "\n")
    for name in ("run", "empty_run"):
        args = [*EXPLAIN, "--method", "saliency", "--out", str(root / name)]
        result = runner.invoke(app, [a.format(root=root) for a in args])
        assert result.exit_code == 0, result.output
    shutil.rmtree(root / "empty_run" / "chunks")  # as if killed before its first chunk
    return root


def _digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


EXPLAIN = ["explain", "--model", "{root}/model.pt", "--data", "{root}/data.csv", "--no-progress"]
SALIENCY = [*EXPLAIN, "--method", "saliency"]
TS = ["explain", "--model", "{root}/model.ts", "--data", "{root}/data.csv", "--no-progress"]
SAG = ["sag", "--model", "{root}/model.pt", "--image", "{root}/data/i0.npy"]
FIT = ["fit", "similar-adversarial", "--model", "{root}/model.pt", "--data", "{root}/data.csv"]
WARP = ["fit", "warp-simulator", "--model", "{root}/model.pt", "--data", "{root}/data.csv"]
EVALUATE = ["evaluate", "{root}/run", "--no-progress"]
ALIGN = ["check-alignment", "--data", "{root}/data.csv", "--no-progress"]


def _with(option: str, value: str, model: str = "model.pt") -> list[str]:
    """Saliency into a new run with ``option`` replaced by ``value``."""
    args = [*SALIENCY, "--out", "{o}"]
    args[args.index("--model") + 1] = "{root}/" + model
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


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
        "unknown param",
        [*SALIENCY, "--param", "bogus=1", "--out", "{o}"],
        ["--param bogus is not a parameter of --method saliency", "abs", "batch_size"],
    ),
    ("unknown method", [*EXPLAIN, "--method", "bogus", "--out", "{o}"], ["bogus", "saliency"]),
    ("device unknown", [*SALIENCY, "--device", "bogus", "--out", "{o}"], ["bogus", "cpu", "cuda"]),
    ("out is a file", [*SALIENCY, "--out", "{root}/afile"], ["--out", "afile", "is a file"]),
    (
        "out below a file",
        [*SALIENCY, "--out", "{root}/afile/sub"],
        ["--out", "lies below", "is a file"],
    ),
    (
        "learned explainer without checkpoint",
        [*EXPLAIN, "--method", "similar_adversarial", "--out", "{o}"],
        ["similar_adversarial", "--explainer-checkpoint"],
    ),
    (
        "gradcam on a TorchScript model",
        [*TS, "--method", "gradcam", "--out", "{o}"],
        ["--method gradcam", "TorchScript", "last convolution is '2'", "integrated_gradients"],
    ),
    (
        "gradcam on a TorchScript model with a layer",
        [*TS, "--method", "gradcam", "--param", "layer=2", "--out", "{o}"],
        ["--method gradcam", "TorchScript", "forward hook"],
    ),
    (
        "gradcam layer that does not exist",
        [*EXPLAIN, "--method", "gradcam", "--param", "layer=conv9", "--out", "{o}"],
        ["layer 'conv9'", "features.0.0", "features.1.3"],
    ),
    ("batch size 0", _with("--batch-size", "0"), ["--batch-size", ">= 1", "0"]),
    ("chunk size 0", _with("--chunk-size", "0"), ["--chunk-size", ">= 1"]),
    ("limit 0", _with("--limit", "0"), ["--limit", ">= 1"]),
    ("target out of range", _with("--target", "99"), ["--target 99", "[0, 2)"]),
    ("target not a class", _with("--target", "best"), ["--target", "'best'", "predicted"]),
    ("channels 5", _with("--channels", "5"), ["--channels", "1 (grey) or 3 (RGB)"]),
    ("shape not sizes", _with("--shape", "abc"), ["--shape", "64,64", "'abc'"]),
    ("normalise unknown", _with("--normalise", "zz"), ["--normalise", "zscore", "'zz'"]),
    ("data missing", _with("--data", "{root}/none.csv"), ["none.csv", "does not exist"]),
    ("empty CSV", _with("--data", "{root}/empty.csv"), ["empty.csv", "is empty", "'path'"]),
    (
        "CSV without header",
        _with("--data", "{root}/noheader.csv"),
        ["noheader.csv", "no 'path' column"],
    ),
    (
        "one image with two labels",
        _with("--data", "{root}/conflict.csv"),
        ["conflict.csv", "different labels"],
    ),
    (
        "no image readable",
        _with("--data", "{root}/unreadable.csv"),
        ["none of the 2 images", "the first:", "none0.npy", "does not exist"],
    ),
    (
        "a 3D volume first for a 2D model",
        _with("--data", "{root}/mixed.csv"),
        ["vol.npy", "(1, 8, 16, 16)", "the model failed"],
    ),
    ("model missing", _with("--model", "{root}/none.pt"), ["none.pt", "does not exist"]),
    ("pickled whole model", _with("--model", "{root}/whole.pt"), ["whole.pt", "state_dict"]),
    (
        "state dict without factory",
        _with("--model", "{root}/state.pt"),
        ["state.pt", "--model-factory"],
    ),
    (
        "state dict with the wrong keys",
        [
            *_with("--model", "{root}/wrongkeys.pt"),
            "--model-factory",
            "medexplain.models.cnn:build_classifier",
        ],
        ["wrongkeys.pt", "do not fit", "missing", "unexpected"],
    ),
    (
        "factory module missing",
        [*_with("--model", "{root}/state.pt"), "--model-factory", "nosuch.nets:cnn"],
        ["factory", "nosuch.nets"],
    ),
    (
        "factory function missing",
        [*_with("--model", "{root}/state.pt"), "--model-factory", "medexplain.models.cnn:nope"],
        ["medexplain.models.cnn", "'nope'"],
    ),
    (
        "different settings on an existing run",
        [*EXPLAIN, "--method", "saliency", "--param", "abs=false", "--out", "{root}/run"],
        ["different settings", "params", "--overwrite"],
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
    (
        "sag unknown param",
        [*SAG, "--param", "bogus=1", "--out", "{o}"],
        ["--param bogus is not a parameter of sag", "beam_width"],
    ),
    ("sag option as a param", [*SAG, "--param", "grid=3", "--out", "{o}"], ["--grid"]),
    (
        "sag on a 3D volume with a 2D model",
        ["sag", "--model", "{root}/model.pt", "--image", "{root}/vol.npy", "--out", "{o}"],
        ["--image", "vol.npy", "a 3D image", "16 x 16"],
    ),
    (
        "fit negative time",
        [*FIT, "--max-seconds", "-5", "--out", "{o}.pt"],
        ["--max-seconds", "Invalid value"],
    ),
    (
        "fit unknown param",
        [*FIT, "--param", "bogus=1", "--out", "{o}.pt"],
        ["--param bogus", "similar-adversarial", "widths"],
    ),
    (
        "fit option as a param",
        [*FIT, "--param", "seed=3", "--out", "{o}.pt"],
        ["--param seed", "--seed"],
    ),
    (
        "fit warp-simulator unknown param",
        [*WARP, "--param", "bogus=1", "--out", "{o}.pt"],
        ["--param bogus", "warp-simulator", "margin"],
    ),
    ("fit out is a folder", [*FIT, "--out", "{root}/data"], ["--out", "is a folder"]),
    ("evaluate steps 0", [*EVALUATE, "--steps", "0"], ["--steps", ">= 1"]),
    ("evaluate seeds 0", [*EVALUATE, "--seeds", "0"], ["--seeds", ">= 1"]),
    ("evaluate n-deletion 0", [*EVALUATE, "--n-deletion", "0"], ["--n-deletion", ">= 1"]),
    ("evaluate batch size 0", [*EVALUATE, "--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("evaluate device unknown", [*EVALUATE, "--device", "bogus"], ["--device", "bogus"]),
    ("evaluate not a run", ["evaluate", "{root}/data"], ["data", "not a medexplain run"]),
    ("global not a run", ["global", "{root}/data"], ["data", "not a medexplain run"]),
    ("report not a run", ["report", "{root}/nothing"], ["nothing", "not a medexplain run"]),
    ("global on an empty run", ["global", "{root}/empty_run"], ["empty_run", "no explained"]),
    ("evaluate on an empty run", ["evaluate", "{root}/empty_run"], ["empty_run", "no explained"]),
    ("global unknown grouping", ["global", "{root}/run", "--by", "age"], ["--by", "'age'"]),
    (
        "global contrast of unknown groups",
        ["global", "{root}/run", "--contrast", "x:y"],
        ["--contrast x:y", "unknown group"],
    ),
    (
        "check-alignment out is a file",
        [*ALIGN, "--out", "{root}/afile"],
        ["--out", "afile", "is a file"],
    ),
    (
        "check-alignment out below a file",
        [*ALIGN, "--out", "{root}/afile/x"],
        ["--out", "lies below"],
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
    assert _digests(inputs) == before, "a refused command changed an input or a run"
    assert not out.exists() and not out.with_suffix(".pt").exists()
    assert not (inputs / "nothing").exists()


def test_cuda_device_without_a_gpu_is_refused(inputs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = [a.format(root=inputs) for a in SALIENCY]
    result = runner.invoke(app, [*argv, "--device", "cuda:0", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no CUDA device" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


def _unwritable(tmp_path):
    """A folder this process cannot create anything in (read-only permissions; for root,
    which ignores them, a read-only system folder), or None."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").mkdir()
    except OSError:
        return folder
    (folder / "probe").rmdir()
    for candidate in ("/sys", "/proc/self"):
        try:
            (tmp_path.__class__(candidate) / "medexplain-probe").mkdir()
        except OSError:
            return tmp_path.__class__(candidate)
    return None


def test_an_unwritable_output_path_is_named_before_any_work(inputs, tmp_path):
    folder = _unwritable(tmp_path)
    if folder is None:
        pytest.skip("no unwritable folder on this machine")
    before = _digests(inputs)
    for args in (
        [*SALIENCY, "--out", f"{folder}/run"],
        [*ALIGN, "--out", f"{folder}/alignment"],
        [*SAG, "--out", f"{folder}/sag"],
        [*FIT, "--out", f"{folder}/sa.pt"],
    ):
        result = runner.invoke(app, [a.format(root=inputs) for a in args])
        flat = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert "Traceback" not in flat and f"--out {folder}/" in flat and "cannot write" in flat
    assert _digests(inputs) == before


@pytest.mark.parametrize("command", ["explain", "global", "evaluate"])
def test_a_run_another_process_writes_is_refused_and_left_whole(inputs, command):
    """The lock a writer holds (the same ``RunStore.lock`` an explain holds) makes every
    command that writes into the run refuse at once instead of interleaving."""
    run = inputs / "run"
    before = _digests(inputs)
    args = {
        "explain": [*SALIENCY, "--out", str(run)],
        "global": ["global", str(run)],
        "evaluate": ["evaluate", str(run), "--no-progress"],
    }[command]
    with RunStore(run).lock():
        result = runner.invoke(app, [a.format(root=inputs) for a in args])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "being written by another medexplain process" in flat and str(run) in flat
    assert _digests(inputs) == before
