"""Evaluation of generated samples (the digits demo now; ADM-compatible FID & co later)."""
