"""Hypothesis runs a fixed, reproducible sequence of examples (derandomize), so a CI run is repeatable.

Unseeded exploration can draw random tiny models so ill-conditioned that fp32 rounding alone moves decoded pixels
past the parity tolerance (seen once: a 3-level VQ-VAE with attention at every level, where ours and transformers'
each moved ~3e-3 between fp32 and fp64 while differing from each other by 8.8e-4). Set HYPOTHESIS_PROFILE=explore
to search with fresh random examples anyway.
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
