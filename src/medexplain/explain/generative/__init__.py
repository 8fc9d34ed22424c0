"""Learned explainers that edit the image: similar/adversarial generators, warping simulators."""

from .jacobian import jacobian_determinant
from .warp_figures import plot_warp, save_nifti
from .warp_simulator import WarpSimulatorExplainer, fit_warp_simulator

__all__ = [
    "WarpSimulatorExplainer",
    "fit_warp_simulator",
    "jacobian_determinant",
    "plot_warp",
    "save_nifti",
]
