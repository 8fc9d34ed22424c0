"""Core utilities: one prediction rule, one chunking helper, one baseline validator,
JSON-safe values, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medexplain.core.errors import one_line, typed_line
from medexplain.core.perturb import check_baseline, make_baseline
from medexplain.core.scores import as_targets, chunked, default_targets, predict_classes
from medexplain.core.serialise import json_safe


def test_predict_classes_by_hand():
    # K > 1: argmax.
    assert predict_classes(torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])).tolist() == [1, 0]
    # One logit: class 1 exactly where the logit is positive (sigmoid > 1/2).
    one = torch.tensor([[-2.0], [0.0], [0.3]])
    assert predict_classes(one).tolist() == [0, 0, 1]
    # Multi-label: one decision per head.
    heads = torch.tensor([[1.0, -1.0], [-0.5, 0.5]])
    assert predict_classes(heads, multilabel=True).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        predict_classes(torch.zeros(3))


def test_default_target_of_a_one_logit_model_is_its_only_output():
    one = torch.tensor([[-2.0], [0.3]])
    assert default_targets(one).tolist() == [0, 0]
    assert as_targets(None, 2, logits=lambda: one).tolist() == [0, 0]
    many = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    assert default_targets(many).tolist() == [1, 0]


def test_chunked_splits_aligned_tensors_like_x():
    x = torch.arange(7.0).view(7, 1)
    t = torch.arange(7) * 10
    calls = []

    def fn(xs, ts):
        calls.append(len(xs))
        return xs[:, 0] + ts

    out = chunked(fn, x, 3, t)
    assert calls == [3, 3, 1]
    assert out.tolist() == [11.0 * i for i in range(7)]
    calls.clear()
    assert torch.equal(chunked(fn, x, None, t), out) and calls == [7]
    with pytest.raises(ValueError, match="batch_size"):
        chunked(fn, x, 0, t)


def test_check_baseline_is_the_rule_make_baseline_follows():
    x = torch.rand(2, 1, 5, 5)
    for ok in ("zero", "blur", 0.25, 1, torch.zeros(1, 1, 5, 5)):
        check_baseline(ok)
        make_baseline(x, ok)
    assert torch.equal(make_baseline(x, 0.25), torch.full_like(x, 0.25))
    with pytest.raises(ValueError, match="baseline must be one of"):
        check_baseline("noise")
    with pytest.raises(ValueError, match="mean_image"):
        check_baseline("mean")
    check_baseline("mean", torch.zeros(1, 5, 5))
    for bad in (True, [0.0], None):
        with pytest.raises(TypeError, match="baseline must be one of"):
            check_baseline(bad)
        with pytest.raises(TypeError):
            make_baseline(x, bad)


def test_json_safe_round_trips_through_json():
    value = {
        1: (np.float32(0.5), np.int64(3), np.bool_(True)),
        "array": np.array([[1.0, np.nan], [np.inf, 2.0]]),
        "tensor": torch.tensor([1.5, float("-inf")]),
        "scalar": torch.tensor(4),
        "nan": float("nan"),
        "path": Path("a") / "b.nii.gz",
        "nested": [{"x": np.float64(-np.inf)}],
        "plain": "text",
    }
    safe = json_safe(value)
    text = json.dumps(safe, allow_nan=False)  # fails on any NaN/inf left behind
    assert json.loads(text) == {
        "1": [0.5, 3, True],
        "array": [[1.0, None], [None, 2.0]],
        "tensor": [1.5, None],
        "scalar": 4,
        "nan": None,
        "path": str(Path("a") / "b.nii.gz"),
        "nested": [{"x": None}],
        "plain": "text",
    }
    assert math.isclose(json_safe(np.float32(0.1)), float(np.float32(0.1)))


def test_one_line():
    assert one_line(ValueError("first line\nsecond line")) == "first line"
    assert one_line(ValueError("  \n padded \n")) == "padded"
    assert one_line(KeyError()) == "KeyError"


def test_typed_line():
    assert typed_line(ValueError("bad header \nmore")) == "ValueError: bad header"
    assert typed_line(OSError()) == "OSError"


def test_one_activation_check_for_every_method():
    from torch import nn

    from medexplain.core.scores import ACTIVATIONS, check_activation, probabilities
    from medexplain.explain import create
    from medexplain.metrics.deletion import deletion_insertion

    for name in ACTIVATIONS:
        check_activation(name)
    logits = torch.tensor([[0.5, -1.0]])
    assert torch.equal(probabilities(logits, "logit"), logits)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(1, 1, 4, 4)
    for bad in (
        lambda: check_activation("relu"),
        lambda: probabilities(logits, "relu"),
        lambda: create("igos", model, activation="relu"),
        lambda: create("igos++", model, activation="relu"),
        lambda: create("sag", model, activation="relu"),
        lambda: deletion_insertion(model, x, 0, x, activation="relu"),
    ):
        with pytest.raises(ValueError, match="activation must be one of"):
            bad()
