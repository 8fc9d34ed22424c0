"""The model's label list is the class space: manifests with a subset of its classes, or no
labels at all, from the command line; networks that return probabilities are explained on
log-probabilities (softmax) or recovered logits (sigmoid), under an honest column name."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from torch import nn
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.data.files import ImageDataset
from medexplain.data.readers import DataError
from medexplain.models.external import LoadedModel, ModelError, load_model

runner = CliRunner(env={"COLUMNS": "200"})
LABELS = ["a", "b", "c", "d"]


class Tiny(nn.Module):
    """Four logits from a 16 x 16 image: a conv, global average pooling, a linear head."""

    def __init__(self, classes: int = 4, head: str = "none") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        if self.head == "softmax":
            return torch.softmax(logits, 1)
        if self.head == "log_softmax":
            return torch.log_softmax(logits, 1)
        if self.head == "sigmoid":
            return torch.sigmoid(logits)
        return logits


def _script(net: nn.Module, path) -> str:
    torch.jit.save(torch.jit.trace(net.eval(), torch.zeros(1, 1, 16, 16)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six images; manifests with 2 of the 4 classes (by name, by index), without a label
    column; the 4-output network as TorchScript with and without softmax inside."""
    root = tmp_path_factory.mktemp("labels")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    names, indices, bare = ["path,label"], ["path,label"], ["path"]
    for i in range(6):
        np.save(root / "img" / f"i{i}.npy", rng.random((16, 16)).astype(np.float32))
        names.append(f"img/i{i}.npy,{'bd'[i % 2]}")
        indices.append(f"img/i{i}.npy,{(0, 2)[i % 2]}")
        bare.append(f"img/i{i}.npy")
    for name, rows in (("names", names), ("indices", indices), ("bare", bare)):
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
    _script(Tiny(), root / "logits.pt")
    _script(Tiny(head="softmax"), root / "softmax.pt")
    (root / "four.yaml").write_text("labels: [a, b, c, d]\ninput: {shape: [1, 16, 16]}\n")
    (root / "probs.yaml").write_text(
        "labels: [a, b, c, d]\nactivation: probabilities\ninput: {shape: [1, 16, 16]}\n"
    )
    return root


def _explain(root, out, data, model="logits.pt", config="four.yaml", *extra):
    args = ["explain", "--model", str(root / model), "--data", str(root / data)]
    if config is not None:
        args += ["--model-config", str(root / config)]
    args += ["--method", "saliency", "--out", str(out), "--no-progress", *extra]
    return runner.invoke(app, args)


def _items(run) -> list[dict[str, str]]:
    with open(run / "items.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_manifest_with_two_of_four_classes_by_name_and_by_index(world, tmp_path):
    for data, expected in (("names.csv", [1, 3]), ("indices.csv", [0, 2])):
        run = tmp_path / data
        result = _explain(world, run, data)
        assert result.exit_code == 0, result.output
        record = json.loads((run / "run.json").read_text())
        assert record["class_names"] == LABELS
        labels = [int(row["label"]) for row in _items(run)]
        assert labels == [expected[i % 2] for i in range(6)]  # row i holds class (b, d)[i % 2]
        result = runner.invoke(app, ["global", str(run)])
        assert result.exit_code == 0, result.output
        index = json.loads((run / "global" / "index.json").read_text())
        counts = {tuple(g["key"]): g["count"] for g in index["groups"]}
        present = [LABELS[i] for i in expected]
        assert {name: counts.get(("label", name), 0) for name in LABELS} == {
            name: 3 if name in present else 0 for name in LABELS
        }


def test_names_without_the_models_labels_are_refused_with_the_remedy(world, tmp_path):
    result = _explain(world, tmp_path / "run", "names.csv", "logits.pt", None)
    assert result.exit_code == 2
    assert "4 output(s)" in result.output and "--model-config" in result.output
    assert not (tmp_path / "run").exists()


def test_integer_labels_index_the_outputs_without_a_model_config(world, tmp_path):
    result = _explain(world, tmp_path / "run", "indices.csv", "logits.pt", None)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["class_names"] == ["0", "1", "2", "3"]


def test_an_unlabelled_manifest_from_the_command_line(world, tmp_path):
    detected = _explain(world, tmp_path / "detected", "bare.csv")
    assert detected.exit_code == 0, detected.output
    assert "notice" in detected.output and "unlabelled" in detected.output
    stated = _explain(world, tmp_path / "stated", "names.csv", "logits.pt", "four.yaml",
                      "--label-column", "none")  # fmt: skip
    assert stated.exit_code == 0, stated.output
    model = load_model(world / "logits.pt", config=world / "four.yaml")
    x = torch.from_numpy(np.stack([np.load(world / "img" / f"i{i}.npy") for i in range(6)]))
    with torch.no_grad():
        predicted = model(x[:, None]).argmax(1).tolist()
    for run in (tmp_path / "detected", tmp_path / "stated"):
        items = _items(run)
        assert [int(row["label"]) for row in items] == [-1] * 6
        assert [int(row["prediction"]) for row in items] == predicted
        result = runner.invoke(app, ["global", str(run)])
        assert result.exit_code == 0 and "grouped by prediction" in result.output
        index = json.loads((run / "global" / "index.json").read_text())
        counts = {g["key"][1]: g["count"] for g in index["groups"] if g["key"][0] == "prediction"}
        expected = {name: predicted.count(i) for i, name in enumerate(LABELS)}
        assert counts == {name: n for name, n in expected.items() if n}
        refused = runner.invoke(app, ["global", str(run), "--by", "label"])
        assert refused.exit_code == 2 and "--by prediction" in refused.output
    refused = _explain(world, tmp_path / "t", "bare.csv", "logits.pt", "four.yaml",
                       "--target", "label")  # fmt: skip
    assert refused.exit_code == 2 and "unlabelled" in refused.output


def test_unlabelled_peppr_scores_against_the_models_own_predictions(world, tmp_path):
    run = tmp_path / "run"
    assert _explain(world, run, "bare.csv").exit_code == 0
    result = runner.invoke(
        app,
        ["evaluate", str(run), "--peppr", "--steps", "4", "--seeds", "1", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    peppr = json.loads((run / "evaluation.json").read_text())["peppr"]
    assert peppr["reference"] == "predictions"
    curves = json.loads((run / "peppr.json").read_text())["accuracy"]
    # nothing erased yet, or everything restored: the model agrees with its own predictions
    assert curves["erase"][0] == pytest.approx(1.0)
    assert curves["restore"][-1] == pytest.approx(1.0)


def test_continuous_labels_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 4), np.float32))
    rows = ["path,label", *[f"x.npy,{0.1 + i / 7:.4f}" for i in range(5)]]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="non-integer numbers"):
        ImageDataset.from_csv(tmp_path / "m.csv")


def test_softmax_inside_the_network_is_explained_on_log_probabilities(world, tmp_path):
    inner = Tiny().eval()
    model = load_model(world / "softmax.pt", config=world / "probs.yaml")
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = torch.log_softmax(inner(x), 1)
    assert model.score == "log_probabilities" and model.outputs == "probabilities"
    assert torch.allclose(model(x), reference, atol=1e-5)
    # the saliency of the stated model is that of log-softmax over the logits (Captum)
    log_softmax = nn.Sequential(inner, nn.LogSoftmax(1))
    target = torch.tensor([0, 1, 2, 3, 0])
    expected = Saliency(log_softmax).attribute(x.clone().requires_grad_(), target=target)
    got = Saliency(model).attribute(x.clone().requires_grad_(), target=target)
    assert torch.allclose(got, expected, atol=1e-5)
    run = tmp_path / "run"
    result = _explain(world, run, "names.csv", "softmax.pt", "probs.yaml")
    assert result.exit_code == 0, result.output
    record = json.loads((run / "run.json").read_text())
    assert record["model"]["score"] == "log_probabilities"
    row = _items(run)[0]
    scores = np.array(row["log_probabilities"].split(), dtype=float)
    assert np.exp(scores).sum() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("head, outputs", [("sigmoid", "probabilities"), ("log_softmax", None)])
def test_other_probability_outputs_give_back_the_scores(head, outputs):
    inner = Tiny(classes=4).eval()
    activation = "sigmoid" if head == "sigmoid" else "log_probabilities"
    model = LoadedModel(Tiny(classes=4, head=head), activation=activation, outputs=outputs)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = inner(x)
        reference = logits if head == "sigmoid" else torch.log_softmax(logits, 1)
        assert torch.allclose(model.eval()(x), reference, atol=1e-4)


def test_stated_outputs_that_do_not_fit_the_network_are_refused_or_warned():
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ModelError, match="outputs: probabilities is stated"):
        LoadedModel(Tiny(head="log_softmax"), activation="probabilities").validate(x)
    with pytest.raises(ModelError, match="sum to 1"):
        LoadedModel(Tiny(head="sigmoid"), activation="probabilities").validate(x)
    with pytest.warns(UserWarning, match="activation: probabilities"):
        LoadedModel(Tiny(head="softmax")).validate(x)
    with pytest.raises(ModelError, match="contradicts"):
        LoadedModel(Tiny(), activation="probabilities", outputs="logits")


class Two(nn.Module):
    """``classes`` logits (``(B,)`` for one) of the image mean and its first-row mean."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.stack([x.mean(dim=(1, 2, 3)), x[:, :, 0].mean(dim=(1, 2))], 1)
        logits = 8 * (features - 0.5)
        return logits[:, 0] if self.classes == 1 else logits


def test_one_logit_and_multilabel_sigmoid_models_through_every_command(world, tmp_path):
    ml = ["path,x,y", *[f"img/i{i}.npy,{i % 2},{(i // 2) % 2}" for i in range(6)]]
    (world / "ml.csv").write_text("\n".join(ml) + "\n")
    (world / "two.yaml").write_text("labels: [x, y]\nactivation: sigmoid\n")
    _script(Two(1), world / "one.pt")
    _script(Two(2), world / "two.pt")
    binary = ["path,label", *[f"img/i{i}.npy,{('neg', 'pos')[i % 2]}" for i in range(6)]]
    (world / "bin.csv").write_text("\n".join(binary) + "\n")
    for name, data, model, config in (
        ("one", "bin.csv", "one.pt", None),
        ("multi", "ml.csv", "two.pt", "two.yaml"),
    ):
        run = tmp_path / name
        result = _explain(world, run, data, model, config)
        assert result.exit_code == 0, result.output
        for command in (
            ["global", str(run)],
            ["evaluate", str(run), "--peppr", "--steps", "4", "--seeds", "1", "--no-progress"],
            ["report", str(run)],
        ):
            result = runner.invoke(app, command)
            assert result.exit_code == 0, (command, result.output)
        record = json.loads((run / "run.json").read_text())
        items = _items(run)
        if name == "multi":
            assert record["multilabel"] and record["class_names"] == ["x", "y"]
            labels = [row["label"] for row in items]
            assert labels == [f"{i % 2} {(i // 2) % 2}" for i in range(6)]  # the 0/1 columns
        else:
            x = np.stack([np.load(world / "img" / f"i{i}.npy") for i in range(6)])
            positive = 8 * (x.mean(axis=(1, 2)) - 0.5) > 0  # the logit's sign, by hand
            assert [int(row["prediction"]) for row in items] == positive.astype(int).tolist()


def test_a_logits_model_keeps_the_run_identity_older_runs_recorded(world, tmp_path):
    """Runs made before networks could state their outputs recorded no 'outputs'/'score':
    a logits model must resume them, so its identity leaves the defaults out; a network
    that returns probabilities is a different model and says so."""
    run = tmp_path / "run"
    assert _explain(world, run, "names.csv").exit_code == 0
    identity = json.loads((run / "run.json").read_text())["identity"]
    assert not {"outputs", "score"} & set(identity["model"])
    again = _explain(world, run, "names.csv")
    assert again.exit_code == 0 and "(0 now" in again.output
    other = tmp_path / "probs"
    assert _explain(world, other, "names.csv", "softmax.pt", "probs.yaml").exit_code == 0
    identity = json.loads((other / "run.json").read_text())["identity"]
    assert identity["model"]["outputs"] == "probabilities"
