"""Pallas kernels (with plain-XLA references and dispatchers that fall back to them)."""

from jaxforget.kernels.cross_attention import (
    DEFAULT_BLOCK_Q,
    cross_attention_with_target,
    fused_cross_attention,
    kernel_applies,
    pick_block_q,
    target_mask_from_tokens,
    xla_cross_attention,
)

__all__ = [
    "DEFAULT_BLOCK_Q",
    "cross_attention_with_target",
    "fused_cross_attention",
    "kernel_applies",
    "pick_block_q",
    "target_mask_from_tokens",
    "xla_cross_attention",
]
