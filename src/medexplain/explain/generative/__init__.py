"""Learned explainers that edit the image: similar/adversarial generators, warping simulators."""

from ...core.jacobian import jacobian_determinant
from .warp_simulator import WarpSimulatorExplainer, fit_warp_simulator

__all__ = [
    "WarpSimulatorExplainer",
    "fit_warp_simulator",
    "jacobian_determinant",
]
