"""jaxforget: continual concept unlearning for text-to-image diffusion models in JAX/Flax NNX."""

__version__ = "0.1.0"
