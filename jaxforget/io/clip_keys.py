"""Key table for the CLIP text encoders (CLIPTextModel, CLIPTextModelWithProjection).

The NNX module tree already carries the ``text_model.`` level, so the canonical key is the
parameter path itself (the layout of real Stable Diffusion ``text_encoder*`` folders and of
transformers 4). transformers 5 writes ``CLIPTextModel`` without that prefix; the alias below
adds it to any key that is neither under ``text_model.`` nor the projection, so both layouts
load. ``position_ids`` is a non-persistent buffer that older files still contain.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxforget.io.weights import KeyTable

CLIP_TEXT_KEYS = KeyTable(
    name="CLIP text encoder",
    renames=(),
    aliases=((r"^(?!text_model\.|text_projection\.)", "text_model."),),
    ignore=(r"(^|\.)position_ids$",),
)
CLIP_KEYS = CLIP_TEXT_KEYS  # short name used by io/diffusers_folder.py


def strip_text_model_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical tensors -> the prefix-less layout of a transformers-5 ``CLIPTextModel``
    state dict (``load_state_dict(strict=True)`` needs it; ``from_pretrained`` takes both)."""
    prefix = "text_model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
