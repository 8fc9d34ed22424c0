"""ONNX models through ONNX Runtime: the same network exported to ONNX and to TorchScript
gives the same forward-only explanations (occlusion, RISE, SAG, deletion/insertion), from
Python and from the command line; gradient methods are refused in one line; unreadable files
are named; fixed-batch exports and static input shapes are handled."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.explain import create
from medexplain.explain.base import NeedsGradientsError, forward_only
from medexplain.models.external import ModelError, load_model
from medexplain.models.fingerprint import classifier_fingerprint
from medexplain.runs import RunStore

pytest.importorskip("onnxruntime")

runner = CliRunner()
SIZE = 16
#: The rows and columns the square network reads.
SQUARE = (slice(4, 8), slice(10, 14))


class SmallCNN(nn.Module):
    """Two convolutions, global average pooling, two logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


class SquareNet(nn.Module):
    """Logits ``(8 (mean of x over SQUARE) - 4, 0)``: class 0 needs the square bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x[:, :, SQUARE[0], SQUARE[1]].mean(dim=(1, 2, 3))
        return torch.stack([8.0 * inside - 4.0, torch.zeros_like(inside)], dim=1)


def export_onnx(
    net: nn.Module, path, batch: int | None = None, example: torch.Tensor | None = None
) -> None:
    """``torch.onnx.export`` with a dynamic batch (``batch=None``) or a fixed one: the
    TorchScript-based exporter (a few milliseconds), or the torch.export-based one (which
    needs onnxscript and a few seconds) where the former is gone."""
    if example is None:
        example = torch.rand(batch or 2, 1, SIZE, SIZE)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            axes = None if batch else {"x": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(
                net.eval(), (example,), str(path), dynamo=False, input_names=["x"],
                output_names=["logits"], dynamic_axes=axes,
            )  # fmt: skip
        except (TypeError, RuntimeError):
            pytest.importorskip("onnxscript")
            dynamic = None if batch else ({0: torch.export.Dim("batch")},)
            torch.onnx.export(
                net.eval(), (example,), str(path), dynamic_shapes=dynamic, external_data=False
            )


def export_torchscript(net: nn.Module, path, example: torch.Tensor | None = None) -> None:
    example = torch.rand(2, 1, SIZE, SIZE) if example is None else example
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net.eval(), example).save(str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """SmallCNN and SquareNet as ONNX (dynamic batch; SmallCNN also with a fixed batch of 2)
    and TorchScript, a model config, and a manifest of 6 images (class b: a bright block)."""
    root = tmp_path_factory.mktemp("onnx")
    cnn, square = SmallCNN(), SquareNet()
    export_onnx(cnn, root / "cnn.onnx")
    export_onnx(cnn, root / "cnn_fixed.onnx", batch=2)
    export_torchscript(cnn, root / "cnn.pt")
    export_onnx(square, root / "square.onnx")
    export_torchscript(square, root / "square.pt")
    (root / "model.yaml").write_text("labels: [a, b]\n")
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(6):
        label = "ab"[i % 2]
        image = rng.normal(0.5, 0.1, (SIZE, SIZE)).astype(np.float32)
        if label == "b":
            image[4:12, 2:8] += 1.0
        np.save(root / f"i{i}.npy", image)
        rows.append(f"i{i}.npy,{label}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root


def images(n: int = 3) -> torch.Tensor:
    return torch.rand((n, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- loading


def test_onnx_forward_equals_the_torch_network_dynamic_and_fixed_batch(files):
    x = images(5)
    with torch.no_grad():
        expected = SmallCNN().eval()(x)
    dynamic = load_model(files / "cnn.onnx")
    fixed = load_model(files / "cnn_fixed.onnx")  # batch 2: chunks 2, 2 and 1 padded
    assert dynamic.source["kind"] == "onnx" and fixed.net.batch == 2 and dynamic.net.batch is None
    # the static (C, H, W) of the graph becomes the input shape; labels from the outputs
    assert dynamic.input_shape == (1, SIZE, SIZE) and dynamic.labels == ["0", "1"]
    with torch.no_grad():
        for model in (dynamic, fixed):
            out = model(x)
            assert out.dtype == torch.float32 and out.shape == (5, 2)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_copy_of_an_onnx_model_opens_its_own_session(files):
    model = load_model(files / "cnn.onnx")
    x = images(2)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    with torch.no_grad():
        expected = model(x)
        for other in copies:
            assert torch.equal(other(x), expected)


def test_onnx_fingerprint_follows_the_weights(files, tmp_path):
    other = SmallCNN()
    with torch.no_grad():
        other.head.bias += 1.0
    export_onnx(other, tmp_path / "other.onnx")
    a, fixed, b = (
        load_model(p)
        for p in (files / "cnn.onnx", files / "cnn_fixed.onnx", tmp_path / "other.onnx")
    )
    # same weights exported twice (dynamic and fixed batch): same fingerprint
    assert classifier_fingerprint(a) == classifier_fingerprint(fixed)
    assert classifier_fingerprint(a) != classifier_fingerprint(b)


def test_onnx_input_of_the_wrong_size_is_one_line(files):
    model = load_model(files / "cnn.onnx")
    with pytest.raises(ModelError, match=r"cnn.onnx takes inputs \(B, 1, 16, 16\), got"):
        model(torch.rand(1, 1, 8, 8))


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("random.onnx", bytes(range(256)) * 4, r"cannot read ONNX model .*random.onnx"),
        ("empty.onnx", b"", r"cannot read ONNX model .*empty.onnx"),
        (
            "random.bin",
            bytes(range(255, -1, -1)) * 4,
            r"random.bin: not a TorchScript file, state dict, medexplain checkpoint or ONNX "
            r"model \(an unknown format\)",
        ),
    ],
)
def test_unreadable_model_files_are_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError, match=expected):
        load_model(path)


def test_missing_onnxruntime_names_the_extra(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(
        ModelError, match=r"cnn.onnx is an ONNX model: install .*medexplain\[onnx\]"
    ):
        load_model(files / "cnn.onnx")


def test_gradients_through_an_onnx_model_are_one_line(files):
    model = load_model(files / "cnn.onnx")
    x = images(1).requires_grad_(True)
    with pytest.raises(ModelError, match=r"cnn.onnx is an ONNX model, which runs forward only"):
        model(x)  # e.g. an explainer class built directly, or fitting a learned explainer


# ---------------------------------------------------------------- explaining


def test_occlusion_maps_of_onnx_and_torchscript_agree(files):
    x = images(3)
    maps = {}
    for name in ("cnn.onnx", "cnn.pt"):
        model = load_model(files / name)
        maps[name] = create("occlusion", model, window=4, stride=2, batch_size=8)(x, 1)
    assert maps["cnn.onnx"].abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(maps["cnn.onnx"], maps["cnn.pt"], atol=1e-5, rtol=0)


def test_3d_occlusion_and_augmented_occlusion_of_onnx_and_torchscript_agree(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        nn.Linear(3, 2),
    ).eval()  # fmt: skip
    export_onnx(net, tmp_path / "net3d.onnx", example=torch.rand(2, 1, 8, 8, 8))
    export_torchscript(net, tmp_path / "net3d.pt", example=torch.rand(2, 1, 8, 8, 8))
    x = torch.rand((2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(2))
    for method, params in [
        ("occlusion", {"window": 4, "stride": 2}),
        ("augmented:occlusion", {"n": 2, "window": 4, "stride": 2}),
    ]:
        maps = [
            create(method, load_model(tmp_path / name), **params)(x, 0)
            for name in ("net3d.onnx", "net3d.pt")
        ]
        assert maps[1].abs().max() > 1e-4
        torch.testing.assert_close(maps[0], maps[1], atol=1e-5, rtol=0)


def test_rise_heat_falls_on_the_square_the_network_reads(files):
    model = load_model(files / "square.onnx")
    x = torch.ones(2, 1, SIZE, SIZE)
    maps = create("rise", model, n_masks=500, batch_size=50)(x, 0)
    reference = create("rise", load_model(files / "square.pt"), n_masks=500, batch_size=50)(x, 0)
    torch.testing.assert_close(maps, reference, atol=1e-5, rtol=0)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[SQUARE] = True
    for m in maps[:, 0]:
        # only the square changes the score: the map there stands well above the level of
        # the rest (E[f], ~0.5), and the hottest 16 pixels are (mostly) the square's 16
        assert m[inside].mean() - m[~inside].mean() > 0.1
        hottest = inside.flatten()[m.flatten().argsort(descending=True)[:16]]
        assert int(hottest.sum()) >= 12, m


@pytest.mark.parametrize(
    "method", ["saliency", "integrated_gradients", "gradcam", "igos", "augmented:saliency"]
)
def test_gradient_methods_are_refused_for_onnx_in_one_line(files, method):
    model = load_model(files / "cnn.onnx")
    assert forward_only(model) == "the ONNX model cnn.onnx"
    inner = method.split(":")[-1]
    with pytest.raises(NeedsGradientsError) as info:
        create(method, model)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{inner} needs the model's gradients")
    assert "cnn.onnx runs forward only" in message and "occlusion, rise, sag" in message
    # the same methods are built for the same network in PyTorch
    create(method, SmallCNN())


# ---------------------------------------------------------------- command line


def _explain(files, model: str, out, *extra: str):
    args = ["explain", "--model", str(files / model), "--model-config", str(files / "model.yaml")]
    args += ["--data", str(files / "data.csv"), "--out", str(out), "--no-progress", *extra]
    return runner.invoke(app, args)


def _stored_maps(out) -> np.ndarray:
    chunks = sorted(RunStore(out).iter_chunks(), key=lambda c: int(c.index[0]))
    return np.concatenate([c.maps for c in chunks])


def test_cli_occlusion_on_onnx_equals_torchscript_and_evaluates(files, tmp_path):
    from medexplain.runs.evaluate import evaluate_run

    runs = {}
    for name in ("cnn.onnx", "cnn.pt"):
        out = tmp_path / name.replace(".", "_")
        result = _explain(files, name, out, "--method", "occlusion", "--param", "window=4")
        assert result.exit_code == 0, result.output
        runs[name] = out
    onnx_maps, ts_maps = _stored_maps(runs["cnn.onnx"]), _stored_maps(runs["cnn.pt"])
    assert onnx_maps.shape == (6, 1, SIZE, SIZE)
    np.testing.assert_allclose(onnx_maps, ts_maps, atol=1e-5, rtol=0)
    # forward-only metrics run on the ONNX model and agree with the TorchScript run; the
    # sanity check (weight randomisation) is skipped with a note
    options = dict(peppr=False, localization=False, n_deletion=4, n_sanity=2, progress=False)
    onnx_eval = evaluate_run(runs["cnn.onnx"], **options)
    ts_eval = evaluate_run(runs["cnn.pt"], **options)
    for key in ("deletion_auc", "insertion_auc"):
        assert onnx_eval["deletion"][key] == pytest.approx(ts_eval["deletion"][key], abs=1e-5)
    assert "cnn.onnx runs forward only" in onnx_eval["sanity"]["skipped"]


def test_cli_gradient_method_on_onnx_is_one_line_exit_2(files, tmp_path):
    out = tmp_path / "run"
    result = _explain(files, "cnn.onnx", out, "--method", "integrated_gradients")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("error: --method integrated_gradients: integrated_gradients needs")
    assert "occlusion, rise, sag" in lines[0]
    assert not out.exists() or not any(out.rglob("*.npz"))  # nothing explained


def test_cli_rise_on_onnx_equals_torchscript(files, tmp_path):
    maps = {}
    for name in ("square.onnx", "square.pt"):
        out = tmp_path / name.replace(".", "_")
        args = ("--method", "rise", "--param", "n_masks=64", "--target", "0")
        result = _explain(files, name, out, *args)
        assert result.exit_code == 0, result.output
        maps[name] = _stored_maps(out)
    np.testing.assert_allclose(maps["square.onnx"], maps["square.pt"], atol=1e-5, rtol=0)


def test_cli_sag_on_onnx_finds_sufficient_roots(files, tmp_path):
    image = np.ones((SIZE, SIZE), np.float32)
    np.save(tmp_path / "ones.npy", image)
    out = tmp_path / "sag"
    args = ["sag", "--model", str(files / "square.onnx"), "--image", str(tmp_path / "ones.npy")]
    result = runner.invoke(app, [*args, "--out", str(out), "--grid", "4", "--target", "0"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sag.json").read_text())
    assert record["passes"]["heuristic_forward"] == 17  # the forward-only heuristic: 16 + 1
    net, x = SquareNet(), torch.from_numpy(image)[None, None]
    with torch.no_grad():
        p = torch.softmax(net(x), 1)[0, 0].item()
    assert record["roots"], "the square is needed: at least one root"
    for root in record["roots"]:
        # re-score each root with the torch network: the visible patches keep >= 0.9 P
        mask = torch.zeros(SIZE, SIZE)
        for patch in root["patches"]:
            r, c = divmod(patch, 4)
            mask[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1
        with torch.no_grad():
            score = torch.softmax(net(x * mask), 1)[0, 0].item()
        assert score >= 0.9 * p - 1e-6
        assert score == pytest.approx(root["score"], abs=1e-5)
