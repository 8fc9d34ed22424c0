"""The demo's learned explainer: the similar/adversarial generator, fitted against the demo
classifier and then explained with like every other method.

The generator (a two-headed U-Net, :mod:`medexplain.explain.generative.similar_adversarial`)
is trained on the training split for at most ``generator_seconds`` (early stopping on the
validation split), saved as ``similar_adversarial.pt`` (loads with ``weights_only=True``),
and scored on the test images: the fraction whose similar image keeps the prediction
(``kept``) and whose adversarial image changes it (``flipped``).
"""

from __future__ import annotations

import time

from ..explain.generative.similar_adversarial import fit_similar_adversarial
from .state import DemoState

GENERATOR = "similar_adversarial"


def fit_learned_explainers(state: DemoState) -> DemoState:
    """Fit the similar/adversarial generator when ``generator_seconds > 0`` and the method is
    among the run's methods; ``explain_methods`` then uses the fitted explainer."""
    settings = state.settings
    if settings.generator_seconds <= 0 or GENERATOR not in settings.methods:
        return state
    with state.timed(GENERATOR):
        started = time.perf_counter()
        explainer = fit_similar_adversarial(
            state.model,
            state.train.dataset(),
            state.val.dataset(),
            out=state.out / f"{GENERATOR}.pt",
            max_seconds=settings.generator_seconds,
            seed=settings.seed,
            progress=state.progress,
            # The generator explains the model's own decision; the demo passes the labels
            # as targets, which differ from it on the few misclassified images.
            other_target="ignore",
        )
        rates = explainer.decision_rates(state.test.images.to(state.device))
        history = explainer.history
        state.learned[GENERATOR] = explainer
        state.learned_fits[GENERATOR] = {
            "checkpoint": f"{GENERATOR}.pt",
            "parameters": explainer.training_parameters(),
            "fit_seconds": time.perf_counter() - started,
            "epochs": len(history.train_loss) if history is not None else 0,
            "test_decision_rates": rates,
        }
    return state
