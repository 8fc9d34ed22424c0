"""Image-wise explainers behind one contract and one registry.

>>> from medexplain.explain import create, available
>>> maps = create("integrated_gradients", model, n_steps=32)(x, target)

Importing this package registers every built-in method.
"""

from ..core.model import model_guard
from . import augment, gradcam, gradients, igos, occlusion, rise, sag  # noqa: F401
from .base import (
    Explainer,
    available,
    create,
    explainer_class,
    register,
    register_wrapper,
)
from .generative import similar_adversarial, warp_simulator, xnn  # noqa: F401

__all__ = [
    "Explainer",
    "available",
    "create",
    "explainer_class",
    "model_guard",
    "register",
    "register_wrapper",
]
