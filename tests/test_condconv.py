"""Conditional convolution against ordinary convolutions (METHODS.md section 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medexplain.explain.generative.condconv import CondConv

CONV = {2: F.conv2d, 3: F.conv3d}
SHAPES = {2: (10, 9), 3: (6, 5, 7)}


def make_layer(dims: int, cond_dim: int = 4, seed: int = 0) -> CondConv:
    torch.manual_seed(seed)
    return CondConv(3, 5, 3, cond_dim=cond_dim, spatial_dims=dims).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("expert", [0, 1, 2])
def test_one_hot_routing_equals_that_experts_convolution(dims, expert):
    layer = make_layer(dims)
    x = torch.randn(4, 3, *SHAPES[dims])
    cond = torch.randn(4, 4)
    routing = F.one_hot(torch.full((4,), expert), 3).float()
    out = layer(x, cond, routing=routing)
    ref = CONV[dims](x, layer.weight[expert], layer.bias[expert], padding=1)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_learned_routing_saturated_on_one_expert(dims):
    # routing r = sigmoid(FC([gap(x), c])): zero FC weights and bias (+30, -30, -30) give
    # r = (1, 0, 0) up to e^-30 whatever the input and condition
    layer = make_layer(dims)
    with torch.no_grad():
        layer.route.weight.zero_()
        layer.route.bias.copy_(torch.tensor([-30.0, 30.0, -30.0]))
    x = torch.randn(3, 3, *SHAPES[dims])
    out = layer(x, torch.randn(3, 4))
    ref = CONV[dims](x, layer.weight[1], layer.bias[1], padding=1)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_per_sample_kernels_are_the_routed_sums(dims):
    layer = make_layer(dims)
    x = torch.randn(4, 3, *SHAPES[dims])
    cond = torch.randn(4, 4)
    out = layer(x, cond)
    for b in range(4):
        features = torch.cat([x[b].flatten(1).mean(1), cond[b]])
        r = torch.sigmoid(layer.route.weight @ features + layer.route.bias)
        kernel = sum(r[e] * layer.weight[e] for e in range(3))
        bias = sum(r[e] * layer.bias[e] for e in range(3))
        ref = CONV[dims](x[b : b + 1], kernel, bias, padding=1)
        assert torch.allclose(out[b : b + 1], ref, atol=1e-5)
        # a single call gives the same result as the batch (batch invariance)
        assert torch.allclose(layer(x[b : b + 1], cond[b : b + 1]), out[b : b + 1], atol=1e-5)


def test_condition_changes_the_output_and_dropout_only_in_training():
    layer = make_layer(2)
    x = torch.randn(2, 3, *SHAPES[2])
    c = torch.zeros(2, 4)
    c2 = c.clone()
    c2[:, 0] = 1.0
    assert not torch.allclose(layer(x, c), layer(x, c2))
    assert torch.equal(layer(x, c), layer(x, c))  # eval: deterministic
    layer.train()
    torch.manual_seed(0)
    routed = torch.stack([layer.routing_weights(x, c) for _ in range(50)])
    kept = routed != 0
    # dropout 0.1: some experts dropped, the kept ones rescaled by 1 / 0.9
    assert 0 < (~kept).float().mean() < 0.3
    eval_r = layer.eval().routing_weights(x, c)
    assert torch.allclose(routed[kept], (eval_r / 0.9).expand_as(routed)[kept], atol=1e-6)


def test_bad_input_is_rejected():
    layer = make_layer(2)
    with pytest.raises(ValueError, match="cond must have shape"):
        layer(torch.randn(2, 3, 8, 8), torch.randn(2, 3))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 4, 8, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="routing_dropout"):
        CondConv(1, 1, cond_dim=0, routing_dropout=1.0)
