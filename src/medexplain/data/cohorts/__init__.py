"""Realistic cohorts on real anatomy (brain MRI, colour fundus, chest radiographs), each with
the ground truth of where its class evidence is (see :mod:`.base`)."""

from .base import Cohort, stratified_split

__all__ = ["Cohort", "stratified_split"]
