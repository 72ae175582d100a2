"""dit_jax: Diffusion Transformers (Peebles & Xie 2023) in JAX/Flax."""

__version__ = "0.1.0"
