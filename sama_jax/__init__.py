"""sama_jax: SAMA instruction-guided video editing on Wan2.1 in JAX/Flax NNX."""

__version__ = "0.1.0"
