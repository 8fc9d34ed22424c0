"""Models from outside: TorchScript, factory + state dict, medexplain checkpoints, refusals."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

from medexplain.models.external import LoadedModel, ModelError, check_logits, load_model

NETS = '''
import pathlib
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, channels=1, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny(channels=1, classes=3):
    torch.manual_seed(1)
    return Tiny(channels, classes)


class Trap(nn.Module):
    """Unpickling this writes a file: proof that a refused checkpoint was never unpickled."""

    def __init__(self, marker):
        super().__init__()
        self.marker = marker

    def __setstate__(self, state):
        pathlib.Path(state["marker"]).write_text("unpickled!")
        super().__setstate__(state)
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A user module ``usernets_<id>`` on sys.path (unique name per test: no import cache)."""
    name = f"usernets_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return name, importlib.import_module(name)


def write_config(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


def test_torchscript_with_yaml_config_normalises_inside_forward(tmp_path, nets):
    _, module = nets
    net = module.tiny(channels=3, classes=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates jit
        torch.jit.script(net).save(str(tmp_path / "model.ts"))
    config = write_config(
        tmp_path / "model.yaml",
        """
        labels: [normal, pneumonia]
        activation: softmax
        input: {shape: [3, 16, 16], mean: [0.5, 0.4, 0.3], std: [0.2, 0.25, 0.5]}
        """,
    )
    model = load_model(tmp_path / "model.ts", config=config)
    assert isinstance(model, LoadedModel) and not model.training
    assert model.labels == ["normal", "pneumonia"] and model.activation == "softmax"
    assert model.input_shape == (3, 16, 16) and model.spatial_dims == 2
    x = torch.rand(4, 3, 16, 16)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - mean) / std))
    info = model.describe()
    assert info["kind"] == "torchscript" and len(info["sha256"]) == 64
    # keyword arguments override the YAML
    model = load_model(tmp_path / "model.ts", config=config, labels=["a", "b"], mean=0.0, std=1.0)
    assert model.labels == ["a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))
    with pytest.raises(ModelError, match=r"expects inputs \(B, 3, 16, 16\)"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ModelError, match="carries its own architecture"):
        load_model(tmp_path / "model.ts", f"{nets[0]}:tiny")


def test_factory_and_state_dict_in_its_variants(tmp_path, nets):
    name, module = nets
    original = module.tiny()
    original.conv.weight.data.add_(0.5)  # differs from what the factory builds
    x = torch.rand(2, 1, 8, 8)
    expected = original(x).detach()
    variants = {
        "plain.pt": original.state_dict(),
        "wrapped.pt": {"state_dict": original.state_dict(), "epoch": 7},
        "parallel.pt": {f"module.{k}": v for k, v in original.state_dict().items()},
    }
    for filename, payload in variants.items():
        torch.save(payload, tmp_path / filename)
        model = load_model(tmp_path / filename, f"{name}:tiny", input_shape=(1, 8, 8))
        assert model.labels == ["0", "1", "2"]  # from the dummy forward
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)
        assert model.describe()["kind"] == "state_dict"
    # factory keyword arguments, the factory given as a file path, factory alone
    torch.save(module.tiny(classes=1).state_dict(), tmp_path / "one.pt")
    model = load_model(
        tmp_path / "one.pt", f"{tmp_path / (name + '.py')}:tiny", factory_kwargs={"classes": 1}
    )
    assert model.labels is None  # no input shape stated: nothing checked yet
    model.validate(torch.rand(1, 1, 8, 8))  # what the CLI does with the first data batch
    assert model.labels == ["0"] and model.activation == "sigmoid"  # one output
    assert load_model(None, f"{name}:tiny").describe()["kind"] == "factory"


def test_medexplain_checkpoint_brings_its_class_names(tmp_path):
    checkpoint = pytest.importorskip("medexplain.models.checkpoint")
    from medexplain.models.cnn import CNNConfig, build_classifier

    net = build_classifier(CNNConfig(in_channels=1, num_classes=3, widths=(4, 8))).eval()
    checkpoint.save_checkpoint(tmp_path / "c.pt", net, extra={"class_names": ["h", "l", "a"]})
    model = load_model(tmp_path / "c.pt", input_shape=(1, 16, 16))
    assert model.labels == ["h", "l", "a"] and model.describe()["kind"] == "medexplain-checkpoint"
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))


def test_pickled_model_is_refused_without_unpickling(tmp_path, nets):
    _, module = nets
    marker = tmp_path / "marker.txt"
    torch.save(module.Trap(str(marker)), tmp_path / "whole.pt")
    for factory in (None, f"{nets[0]}:tiny"):
        with pytest.raises(ModelError) as error:
            load_model(tmp_path / "whole.pt", factory)
        message = str(error.value)
        assert "refusing to load" in message and "whole.pt" in message and "\n" not in message
    assert not marker.exists()


def test_clear_errors(tmp_path, nets):
    name, module = nets
    torch.save(module.tiny().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="pass factory='module:function'"):
        load_model(tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"network returns 3 output\(s\) but 2 labels"):
        load_model(tmp_path / "w.pt", f"{name}:tiny", labels=["a", "b"], input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.pt", f"{name}:tiny")
    with pytest.raises(ModelError, match="must be 'module:function'"):
        load_model(tmp_path / "w.pt", "no_colon")
    with pytest.raises(ModelError, match="has no 'missing'"):
        load_model(tmp_path / "w.pt", f"{name}:missing")
    with pytest.raises(ModelError, match="cannot import the factory module"):
        load_model(tmp_path / "w.pt", "not_a_module_xyz:f")
    torch.save(module.tiny(channels=2).state_dict(), tmp_path / "w2.pt")
    with pytest.raises(ModelError, match="size mismatch"):
        load_model(tmp_path / "w2.pt", f"{name}:tiny")
    torch.save({"head.weight": torch.zeros(3, 4)}, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match=r"3 missing \(e\.g\."):
        load_model(tmp_path / "partial.pt", f"{name}:tiny")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=r"junk\.pt"):
        load_model(tmp_path / "junk.pt", f"{name}:tiny")
    bad = write_config(tmp_path / "bad.yaml", "labels: [a]\nlables: [b]\n")
    with pytest.raises(ModelError, match=r"unknown key\(s\) \['lables'\]"):
        load_model(tmp_path / "w.pt", f"{name}:tiny", config=bad)
    with pytest.raises(ModelError, match="softmax' over a single output"):
        load_model(tmp_path / "w.pt", f"{name}:tiny", labels=["x"], activation="softmax")
    with pytest.raises(ModelError, match="std must be positive"):
        load_model(tmp_path / "w.pt", f"{name}:tiny", std=0.0)


class NaNNet(nn.Module):
    def forward(self, x):
        out = x.flatten(1)[:, :2].clone()
        out[x.flatten(1)[:, 0] > 0.5] = float("nan")
        return out


def test_non_finite_logits_name_the_items():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, float("inf")]])
    with pytest.raises(ModelError) as error:
        check_logits(logits, ["a.png", "b.png", "c.png"])
    assert "b.png, c.png" in str(error.value) and "a.png" not in str(error.value)
    with pytest.raises(ModelError, match="for batch 7"):
        check_logits(logits, "batch 7")
    assert check_logits(logits[:1], "ok") is not None
    model = LoadedModel(NaNNet(), input_shape=(1, 4, 4))
    with pytest.raises(ModelError, match="non-finite logits"):
        model.validate(torch.full((1, 1, 4, 4), 0.9))
    assert model.validate(torch.zeros(1, 1, 4, 4)).shape == (1, 2) and model.labels == ["0", "1"]
