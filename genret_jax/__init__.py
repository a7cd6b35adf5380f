"""genret-jax: generative retrieval scaling studies in JAX/Flax."""

__version__ = "0.1.0"
