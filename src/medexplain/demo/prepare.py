"""The demo's first steps: the data (benchmark or cohort), the classifier, the images to
explain."""

from __future__ import annotations

import torch
from torch import nn

from ..data.synthetic import make_benchmark
from ..explain.batch import predicted_classes
from ..models.checkpoint import save_checkpoint
from ..models.cnn import CNNConfig, build_classifier
from ..models.standard import StandardNetConfig, build_standard_network
from ..models.train import evaluate_classifier, train_classifier
from .cohorts import make_cohort
from .settings import DemoSettings
from .state import DemoState


def generate_data(state: DemoState) -> DemoState:
    """The aligned benchmark with its corner-marker shortcut (or the settings' cohort), split
    train / val / test."""
    settings = state.settings
    with state.timed("generate"):
        torch.manual_seed(settings.seed)
        if settings.cohort is not None:
            state.bench = make_cohort(
                settings.cohort,
                settings.n_images,
                dims=settings.dims,
                seed=settings.seed,
                shortcut=settings.shortcut,
                shortcut_class=settings.shortcut_class,
            )
        else:
            state.bench = make_benchmark(
                settings.n_images,
                dims=settings.dims,
                size=settings.size,
                shortcut=settings.shortcut,
                shortcut_class=settings.shortcut_class,
                seed=settings.seed,
            )
        state.train, state.val, state.test = state.bench.split(seed=settings.seed)
    return state


def build_model(settings: DemoSettings, in_channels: int, num_classes: int) -> nn.Module:
    """The settings' classifier (``arch``), initialised from the run's seed."""
    if settings.arch == "cnn":
        config = CNNConfig(
            in_channels=in_channels,
            num_classes=num_classes,
            spatial_dims=settings.dims,
            widths=settings.widths,
        )
        return build_classifier(config)
    return build_standard_network(
        StandardNetConfig(
            arch=settings.arch,
            spatial_dims=settings.dims,
            in_channels=in_channels,
            num_classes=num_classes,
            seed=settings.seed,
        )
    )


def train_model(state: DemoState) -> DemoState:
    """Train the classifier, score it on the test split, save ``classifier.pt``."""
    settings = state.settings
    with state.timed("train"):
        in_channels = int(state.bench.images.shape[1])
        model = build_model(settings, in_channels, len(state.bench.class_names))
        model = model.to(state.device)
        state.history = train_classifier(
            model,
            state.train.dataset(),
            state.val.dataset(),
            epochs=settings.train_epochs,
            lr=settings.train_lr,
            max_seconds=settings.train_seconds,
            seed=settings.seed,
            device=state.device,
            progress=state.progress,
            patience=settings.train_patience,
            monitor=settings.train_monitor,
        )
        state.model = model.eval()
        state.classifier_metrics = evaluate_classifier(
            model, state.test.dataset(), device=state.device
        )
        extra = {"class_names": list(state.bench.class_names)}
        save_checkpoint(state.out / "classifier.pt", model, extra=extra)
    return state


def choose_images(state: DemoState) -> DemoState:
    """The first ``n_explain`` test images (every method explains them), the next
    ``n_peppr`` for PEPPR (held out from the global maps), and what the figures draw on."""
    settings, test, bench = state.settings, state.test, state.bench
    state.explain_set = test.subset(torch.arange(min(settings.n_explain, len(test))))
    state.preds = predicted_classes(state.model, state.explain_set.images.to(state.device)).cpu()
    n_explained = len(state.explain_set.labels)
    state.peppr_set = test.subset(torch.arange(n_explained, len(test))[: settings.n_peppr])
    if len(state.peppr_set) == 0:
        state.peppr_set = state.explain_set
    state.mean_image = state.train.mean_image()
    # Outlines drawn on the global maps: each label's true region, plus the marker for the
    # shortcut class.
    outlines = dict(bench.regions)
    shortcut_name = bench.class_names[settings.shortcut_class]
    outlines[shortcut_name] = outlines.get(shortcut_name, bench.marker) | bench.marker
    state.outlines = outlines
    return state
