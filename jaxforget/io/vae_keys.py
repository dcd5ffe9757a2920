"""Key table for AutoencoderKL.

The module tree uses diffusers' names, so the canonical key is the parameter path itself.
Older diffusers-format SD checkpoints name the mid-block attention ``query`` / ``key`` /
``value`` / ``proj_attn`` (diffusers' deprecated AttentionBlock), sometimes stored as 1x1
convs ([O, I, 1, 1]); the aliases map the names, and ``weights.from_torch_layout`` already
turns a 1x1-conv kernel into a linear one.
"""

from __future__ import annotations

from jaxforget.io.weights import KeyTable

VAE_KEYS = KeyTable(
    name="AutoencoderKL",
    renames=(),
    aliases=(
        (r"(\.attentions\.\d+)\.query\.", r"\1.to_q."),
        (r"(\.attentions\.\d+)\.key\.", r"\1.to_k."),
        (r"(\.attentions\.\d+)\.value\.", r"\1.to_v."),
        (r"(\.attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
    ),
)
