"""ragjax: retrieval-augmented generation in JAX/Flax."""
__version__ = "0.1.0"
