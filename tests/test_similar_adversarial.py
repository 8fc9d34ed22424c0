"""Similar + adversarial generators (Charachon et al., METHODS.md section 4).

The behavioural tests fit a small generator briefly on a subset of the benchmark's training
images and check the paper's two properties on the held-out test images (the similar image
keeps the classifier's decision, the adversarial one changes it) and that |x_s - x_a|
points at the synthetic ground-truth evidence. The full 5-minute training and the targets
of the issue (95 % / 90 % / AUROC 0.85) are measured in benchmarks/learned_explainers.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from medexplain.explain import create
from medexplain.explain.augment import RandomAffine, warp
from medexplain.explain.generative.similar_adversarial import (
    SimilarAdversarial,
    adversarial_loss,
    fit_similar_adversarial,
    reconstruction,
    two_class_logits,
)
from medexplain.explain.generative.unet import UNet, UNetConfig
from medexplain.metrics.localization import auroc
from medexplain.models.checkpoint import load_checkpoint

# Short fit of the behavioural tests: 96 steps on 192 images, without augmentation (which
# slows early convergence; it is tested separately below and measured in the benchmark).
SHORT_FIT = dict(widths=(8, 16, 32), epochs=8, lr=3e-3, train_batch_size=16, augment=False)
N_TRAIN = 192


def tiny_classifier(dims: int = 2, outputs: int = 3) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    torch.manual_seed(0)
    return nn.Sequential(
        conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(4, outputs)
    )


@pytest.fixture(scope="module")
def fitted(classifier2d, bench2d):
    train = bench2d[0]
    subset = train.subset(torch.arange(0, len(train), len(train) // N_TRAIN)[:N_TRAIN])
    explainer = SimilarAdversarial(classifier2d, **SHORT_FIT)
    explainer.fit(subset.dataset(), progress=False)  # no validation: the last epoch is kept
    return explainer


# --------------------------------------------------------------------------- the losses


def test_adversarial_loss_matches_its_definition():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    predicted = torch.tensor([0, 1, 2, 3, 1, 2])
    p = torch.softmax(logits.double(), 1)
    expected = -torch.log(1 - p[torch.arange(6), predicted])
    torch.testing.assert_close(
        adversarial_loss(logits, predicted).double(), expected, atol=1e-5, rtol=1e-5
    )
    # a chosen class: cross-entropy to it, except where it is already the prediction
    chosen = adversarial_loss(logits, predicted, target=2)
    ce = F.cross_entropy(logits, torch.full((6,), 2), reduction="none")
    mine = predicted == 2
    torch.testing.assert_close(chosen[~mine], ce[~mine])
    torch.testing.assert_close(chosen[mine], adversarial_loss(logits, predicted)[mine])
    # stable where p_y -> 1 (a naive log(1 - p) would be inf)
    extreme = torch.tensor([[60.0, -60.0, -60.0]])
    value = adversarial_loss(extreme, torch.tensor([0]))
    assert torch.isfinite(value).all() and value.item() == pytest.approx(
        120 - math.log(2), rel=1e-4
    )


def test_single_logit_is_a_two_class_softmax_and_reconstruction_is_mse_plus_mae():
    z = torch.tensor([[-2.0], [0.5]])
    two = two_class_logits(z)
    torch.testing.assert_close(torch.softmax(two, 1)[:, 1], torch.sigmoid(z[:, 0]))
    assert two.argmax(1).tolist() == [0, 1]
    a, b = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    expected = ((a - b) ** 2).mean((1, 2, 3)) + (a - b).abs().mean((1, 2, 3))
    torch.testing.assert_close(reconstruction(a, b), expected)


def test_loss_terms_and_weights():
    model = tiny_classifier().eval()
    gen = UNet(UNetConfig(widths=(4, 8), residual=False))
    explainer = SimilarAdversarial(model, generator=gen, similar_weight=3.0, adversarial_weight=0.5)
    x = torch.rand(4, 1, 12, 12)
    terms = explainer.losses(x)
    out = gen(x)
    y = model(x).argmax(1)
    torch.testing.assert_close(terms["similar_ce"], F.cross_entropy(model(out[:, 0]), y))
    torch.testing.assert_close(
        terms["adversarial_ce"], adversarial_loss(model(out[:, 1]), y).mean()
    )
    torch.testing.assert_close(terms["similar_rec"], reconstruction(out[:, 0], x).mean())
    torch.testing.assert_close(
        terms["adversarial_rec"], reconstruction(out[:, 1], out[:, 0]).mean()
    )
    expected = (
        0.01 * terms["similar_ce"]  # the successor code's classification weights
        + 0.2 * terms["adversarial_ce"]
        + 3.0 * terms["similar_rec"]
        + 0.5 * terms["adversarial_rec"]
    )
    torch.testing.assert_close(terms["total"], expected)


def test_paper_variant_weights_the_classification_terms_as_the_successor_code():
    model = tiny_classifier().eval()
    gen = UNet(UNetConfig(widths=(4, 8), residual=False))
    x = torch.rand(4, 1, 12, 12)
    paper = SimilarAdversarial(model, generator=gen, variant="paper")
    assert paper.ce_weights == (0.01, 0.2)
    terms = paper.losses(x)
    expected = (
        0.01 * terms["similar_ce"]
        + 0.2 * terms["adversarial_ce"]
        + 10.0 * terms["similar_rec"]
        + 2.0 * terms["adversarial_rec"]
    )
    torch.testing.assert_close(terms["total"], expected)
    # One weight given, the other from the variant; the default shares the paper's weights.
    mixed = SimilarAdversarial(model, generator=gen, variant="paper", similar_ce_weight=0.5)
    assert mixed.ce_weights == (0.5, 0.2)
    assert SimilarAdversarial(model, generator=gen).ce_weights == (0.01, 0.2)
    ones = SimilarAdversarial(model, generator=gen, similar_ce_weight=1, adversarial_ce_weight=1)
    assert ones.ce_weights == (1.0, 1.0)
    with pytest.raises(ValueError, match="variant must be one of"):
        SimilarAdversarial(model, variant="successor")
    with pytest.raises(ValueError, match="adversarial_ce_weight must be >= 0"):
        SimilarAdversarial(model, adversarial_ce_weight=-1.0)


def test_untrained_residual_generator_is_the_identity():
    gen = UNet(UNetConfig(spatial_dims=3, widths=(4, 8, 8)))
    x = torch.rand(2, 1, 9, 10, 11)  # odd sizes: the decoder resizes to each skip
    out = gen(x)
    assert out.shape == (2, 2, 1, 9, 10, 11)
    torch.testing.assert_close(out[:, 0], x)
    torch.testing.assert_close(out[:, 1], x)


# --------------------------------------------------------------------------- fitting


@pytest.mark.slow
def test_similar_keeps_and_adversarial_flips_the_decision(fitted, bench2d):
    """After a short fit on 192 training images, on the 180 unseen test images: the similar
    image keeps the decision and the adversarial one changes it.

    Measured on the reference machine: 100 % kept, 99.4 % flipped (with 4 epochs instead of
    8, a classifier trained on another thread count flipped only 73 %). We require 95 % / 85 %
    (the issue's targets after the full training are 95 % / 90 %): the margin absorbs a
    different training trajectory on another BLAS, and both bounds are far from what an
    untrained generator gives (it is the identity: 100 % kept, 0 % flipped)."""
    _, _, test = bench2d
    rates = fitted.decision_rates(test.dataset())
    assert rates["n"] == len(test)
    assert rates["kept"] >= 0.95, rates
    assert rates["flipped"] >= 0.85, rates
    assert fitted.history is not None and len(fitted.history.train_loss) == SHORT_FIT["epochs"]


@pytest.mark.slow
def test_difference_map_localizes_the_ground_truth(fitted, bench2d):
    """|x_s - x_a| ranks the evidence pixels (lesion blob, shrunken nucleus) above the rest:
    per-image AUROC on the test images that have evidence (chance = 0.5).

    Measured after the short fit: 0.89 over all, 0.95 on lesion images (the blob edit is
    learnt first; undoing an atrophy takes longer; 4 epochs gave 0.81 on lesion images).
    We require 0.75 and 0.85; the issue's 0.85 target for the full training is checked by
    benchmarks/learned_explainers.py."""
    _, _, test = bench2d
    has = test.evidence.flatten(1).any(1)
    x = test.images[has]
    maps = fitted(x)
    assert maps.shape == (len(x), 1, *x.shape[2:]) and (maps >= 0).all()
    scores = auroc(maps, test.evidence[has])
    lesion = test.labels[has] == test.class_names.index("lesion")
    assert scores.mean() >= 0.75, scores.mean()
    assert scores[lesion].mean() >= 0.85, scores[lesion].mean()
    # the map is the difference of the two generated images
    x_s, x_a = fitted.generate(x[:4])
    torch.testing.assert_close(maps[:4], (x_s - x_a).abs().sum(1, keepdim=True))


@pytest.fixture(scope="module")
def tiny():
    """A generator fitted for one epoch on 8 random images against a tiny classifier."""
    model = tiny_classifier().eval()
    data = TensorDataset(torch.rand(8, 1, 16, 16), torch.zeros(8, dtype=torch.long))
    explainer = SimilarAdversarial(model, widths=(4, 8), epochs=1, train_batch_size=4, lr=1e-2)
    return explainer.fit(data, progress=False)


def test_checkpoint_round_trip(tiny, tmp_path):
    fitted = tiny
    path = fitted.save(tmp_path / "gen.pt")
    raw = torch.load(path, weights_only=True)  # only tensors and plain values inside
    assert raw["kind"] == "similar_adversarial_unet"
    assert raw["extra"]["training"]["similar_weight"] == fitted.similar_weight
    assert raw["extra"]["training"]["similar_ce_weight"] == fitted.ce_weights[0]
    # a checkpoint keeps the variant and the classification weights it was trained with
    paper = SimilarAdversarial(fitted.model, generator=fitted.generator, variant="paper")
    reloaded = SimilarAdversarial(fitted.model, checkpoint=paper.save(tmp_path / "paper.pt"))
    assert reloaded.variant == "paper" and reloaded.ce_weights == (0.01, 0.2)
    module, _ = load_checkpoint(path)
    assert isinstance(module, UNet) and module.config == fitted.generator.config
    loaded = create("similar_adversarial", fitted.model, checkpoint=path)
    x = torch.rand(5, 1, 16, 16)
    assert fitted(x).abs().max() > 0
    torch.testing.assert_close(loaded(x), fitted(x), atol=0, rtol=0)
    for a, b in zip(loaded.generate(x), fitted.generate(x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # from a fitted generator object
    shared = create("similar_adversarial", fitted.model, generator=module)
    torch.testing.assert_close(shared(x), fitted(x), atol=0, rtol=0)


def test_targets_other_than_the_prediction(tiny):
    fitted = tiny
    x = torch.rand(6, 1, 16, 16)
    predicted = fitted.model(x).argmax(1)
    other = (predicted + 1) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = fitted(x)  # target=None: the prediction, no warning
        torch.testing.assert_close(fitted(x, predicted), reference)
    with pytest.warns(UserWarning, match="own decision: 6 of 6"):
        maps = fitted(x, other)
    torch.testing.assert_close(maps, reference)  # the map of the predicted class
    strict = SimilarAdversarial(fitted.model, generator=fitted.generator, other_target="raise")
    with pytest.raises(ValueError, match="own decision"):
        strict(x, other)


def test_fit_leaves_the_model_untouched_and_augments_the_inputs():
    model = tiny_classifier().train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 12, 12)
    seen = []

    class Spy(SimilarAdversarial):
        def losses(self, images, generator=None):
            seen.append(images.detach().clone())
            return super().losses(images, generator)

    spy = Spy(model, widths=(4, 8), epochs=2, train_batch_size=4, augment="flips", seed=1)
    spy.fit(TensorDataset(x, torch.zeros(8, dtype=torch.long)), progress=False)
    # the classifier: flags, requires_grad, weights and batch-norm statistics unchanged
    assert all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    # every training input is a flip of a dataset image, and some are really flipped
    flips = [x.flip(dims) for dims in [(), (2,), (3,), (2, 3)]]
    flipped = 0
    for batch in seen:
        for image in batch:
            matches = [
                i for i, f in enumerate(flips) if (f - image).abs().amax((1, 2, 3)).min() < 1e-4
            ]
            assert matches, "a training input is not a flipped dataset image"
            flipped += matches[0] > 0
    assert flipped > 0
    # without augmentation the inputs are the images themselves
    seen.clear()
    Spy(model, widths=(4, 8), epochs=1, train_batch_size=4, augment=False).fit(
        TensorDataset(x, torch.zeros(8, dtype=torch.long)), progress=False
    )
    for batch in seen:
        for image in batch:
            assert (x - image).abs().amax((1, 2, 3)).min() == 0


def test_unfitted_explainer_and_bad_input_raise_clearly(tmp_path):
    model = tiny_classifier()
    explainer = create("similar_adversarial", model)
    with pytest.raises(RuntimeError, match="fit it first"):
        explainer(torch.rand(2, 1, 12, 12))
    with pytest.raises(RuntimeError, match="fit it first"):
        explainer.generate(torch.rand(2, 1, 12, 12))
    with pytest.raises(ValueError, match="either checkpoint= or generator="):
        SimilarAdversarial(model, checkpoint=tmp_path / "x.pt", generator=UNet())
    with pytest.raises(ValueError, match="adversarial_target"):
        SimilarAdversarial(model, adversarial_target="most_likely")
    with pytest.raises(TypeError, match="UNet"):
        SimilarAdversarial(model, generator=nn.Identity())
    # a 2D generator given to the explainer of a 3D classifier
    gen2d = SimilarAdversarial(tiny_classifier(dims=3), generator=UNet(UNetConfig(widths=(4,))))
    with pytest.raises(ValueError, match="1-channel 2D"):
        gen2d(torch.rand(1, 1, 6, 6, 6))


def test_fit_function_single_logit_and_3d(tmp_path):
    """fit_similar_adversarial (the CLI entry point) on a 3D single-logit model writes a
    checkpoint that create() loads; the map is identical after loading."""
    model = tiny_classifier(dims=3, outputs=1).eval()
    x = torch.rand(6, 1, 8, 8, 8)
    data = TensorDataset(x, torch.zeros(6, dtype=torch.long))
    explainer = fit_similar_adversarial(
        model,
        data,
        data,
        out=tmp_path / "g3.pt",
        progress=False,
        widths=(4, 8),
        epochs=2,
        train_batch_size=3,
        lr=1e-2,
        augment={"rotation": 5.0},
    )
    assert explainer.history.best_epoch >= 0 and (tmp_path / "g3.pt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # target 0 is the only output of a single-logit model
        maps = explainer(x, 0)
    loaded = create("similar_adversarial", model, checkpoint=tmp_path / "g3.pt")
    torch.testing.assert_close(loaded(x, 0), maps, atol=0, rtol=0)
    assert maps.shape == (6, 1, 8, 8, 8)


def test_augmentation_defaults_keep_alignment_and_paper_is_the_successor_codes():
    explainer = SimilarAdversarial(tiny_classifier())
    assert explainer.augment == RandomAffine(rotation=5.0, zoom=(0.8, 1.0), flip=False)
    paper = SimilarAdversarial(tiny_classifier(), variant="paper")
    assert paper.augment == RandomAffine(rotation=5.0, zoom=(0.8, 1.0), flip=(0,))
    assert SimilarAdversarial(tiny_classifier(), augment=False).augment is None
    custom = SimilarAdversarial(tiny_classifier(), augment={"rotation": 2.0, "flip": (1,)})
    assert custom.augment.rotation == 2.0 and custom.augment.flip == (1,)
    # Property: an image bright in its left half stays brighter on the left after every
    # default (and every paper) transform; the former default (all flips) swaps some.
    image = torch.zeros(1, 1, 32, 32)
    image[..., :16] = 1.0

    def swapped(augment: RandomAffine) -> int:
        theta = augment.sample(200, (32, 32), torch.Generator().manual_seed(0))
        out = warp(image.expand(200, -1, -1, -1), theta, "border")
        left, right = out[..., :16].mean((1, 2, 3)), out[..., 16:].mean((1, 2, 3))
        return int((left < right).sum())

    assert swapped(explainer.augment) == 0 and swapped(paper.augment) == 0
    assert swapped(RandomAffine.all_flips()) > 50  # about half of 200
    # The paper's vertical flips do happen: top-bright images become bottom-bright.
    theta = paper.augment.sample(200, (32, 32), torch.Generator().manual_seed(0))
    top = warp(image.transpose(2, 3).expand(200, -1, -1, -1), theta, "border")
    flipped = top[..., :16, :].mean((1, 2, 3)) < top[..., 16:, :].mean((1, 2, 3))
    assert int(flipped.sum()) > 50
    # Rotations stay within +-5 degrees: the linear part is zoom * rotation (square image).
    linear = explainer.augment.sample(200, (32, 32), torch.Generator().manual_seed(1))[..., :2]
    angles = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert angles.abs().max() <= 5.0 + 1e-4 and angles.abs().max() > 4.0
    # a zoom of 0.8 magnifies: the centre pixel stays, the image grows
    theta = torch.tensor([[[0.8, 0.0, 0.0], [0.0, 0.8, 0.0]]])
    image = torch.zeros(1, 1, 21, 21)
    image[..., 6:15, 6:15] = 1.0
    assert warp(image, theta).sum() > image.sum()
