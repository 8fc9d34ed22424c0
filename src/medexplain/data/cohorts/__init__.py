"""Realistic cohorts on real anatomy (brain MRI, colour fundus, chest radiographs), each with
the ground truth of where its class evidence is (see :mod:`.base`)."""

from .base import Cohort, stratified_split
from .brain import make_brain, save_cohort_nifti
from .chest import make_chest
from .retina import make_retina

__all__ = [
    "Cohort",
    "make_brain",
    "make_chest",
    "make_retina",
    "save_cohort_nifti",
    "stratified_split",
]
