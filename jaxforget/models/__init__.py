"""Flax NNX models following diffusers / transformers block structure and parameter names."""
