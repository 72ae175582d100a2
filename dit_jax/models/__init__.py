"""DiT models: the network (`DiT`), its embeddings and the registry of named variants."""
from dit_jax.models import embeddings, variants
from dit_jax.models.dit import BLOCK_TYPES, DiT, DiTBlock, FinalLayer, activations

__all__ = ["BLOCK_TYPES", "DiT", "DiTBlock", "FinalLayer", "activations", "embeddings",
           "variants"]
