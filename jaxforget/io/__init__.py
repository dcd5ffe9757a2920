"""Diffusers-format folders in and out (safetensors only; pickle formats are refused)."""
