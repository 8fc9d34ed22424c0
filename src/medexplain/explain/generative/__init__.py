"""Learned explainers that edit the image: similar/adversarial generators, warping simulators."""
