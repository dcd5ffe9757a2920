"""Key tables for the CLIP vision tower and the full CLIP model; loading a Hugging Face CLIP folder.

A CLIP folder (``openai/clip-vit-large-patch14`` layout, or transformers' ``save_pretrained``)::

    config.json                 model_type "clip", text_config, vision_config, projection_dim, ...
    model.safetensors           (or model.safetensors.index.json + shards); pickles are refused
    vocab.json + merges.txt     (and/or tokenizer.json): the CLIPTokenizer
    preprocessor_config.json    optional: CLIPImageProcessor settings (defaults: the model's size)

The module trees carry transformers' names, so canonical keys are the parameter paths themselves:
``text_model.*`` (the text side is exactly what ``clip_keys`` reads, under its ``text_model.``
prefix), ``vision_model.*``, ``text_projection.weight``, ``visual_projection.weight``,
``logit_scale``. Older files also hold the ``position_ids`` buffers, which are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from jaxforget.errors import CheckpointFormatError, ConfigError
from jaxforget.io.clip_keys import CLIP_TEXT_KEYS
from jaxforget.io.diffusers_folder import check_tokenizer_files, load_tokenizer, read_json
from jaxforget.io.weights import KeyTable, find_weight_files, load_module_weights
from jaxforget.models.clip_vision import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    ImagePreprocess,
)

_POSITION_IDS = r"(^|\.)position_ids$"

# CLIPVisionModel(WithProjection). transformers 5 writes CLIPVisionModel without the
# ``vision_model.`` level (as it does CLIPTextModel): the alias adds it, so both layouts load.
CLIP_VISION_KEYS = KeyTable(
    name="CLIP vision encoder",
    renames=(),
    aliases=((r"^(?!vision_model\.|visual_projection\.)", "vision_model."),),
    ignore=(_POSITION_IDS,),
)

# The full CLIPModel: every key is already under its tower (text_model. / vision_model.), so no
# prefix alias applies here (it would misfile the other tower's keys); the text side keeps
# clip_keys' renames and ignored buffers.
CLIP_MODEL_KEYS = KeyTable(
    name="CLIP model",
    renames=CLIP_TEXT_KEYS.renames + CLIP_VISION_KEYS.renames,
    aliases=(),
    ignore=tuple(dict.fromkeys(CLIP_TEXT_KEYS.ignore + CLIP_VISION_KEYS.ignore)),
)

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass
class CLIPBundle:
    """What ``load_clip_model`` returns: the model, its tokenizer and its image preprocessing."""

    model: CLIPModel
    tokenizer: Any  # transformers.CLIPTokenizer
    preprocess: ImagePreprocess
    config: CLIPConfig
    path: Path

    @property
    def max_length(self) -> int:
        """Token sequence length for the text tower: the tokenizer's, capped by the position table."""
        return min(int(self.tokenizer.model_max_length), self.config.text_config.max_position_embeddings)


def _parse(path: Path, parse: Callable[[dict], Any]) -> Any:
    try:
        return parse(read_json(path))
    except ConfigError as err:
        raise CheckpointFormatError(f"{path}: {err}") from None


def read_clip_config(folder: str | os.PathLike) -> CLIPConfig:
    """``config.json`` of a full CLIP folder -> CLIPConfig (CheckpointFormatError naming the file)."""
    return _parse(Path(folder) / "config.json", CLIPConfig.from_transformers)


def read_preprocess(folder: str | os.PathLike, image_size: int) -> ImagePreprocess:
    """``preprocessor_config.json`` if present, else CLIP's defaults for ``image_size``."""
    path = Path(folder) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return ImagePreprocess.for_image_size(image_size)
    return _parse(path, lambda d: ImagePreprocess.from_transformers(d, image_size))


def load_clip_model(
    folder: str | os.PathLike,
    *,
    compute_dtype=None,
    param_dtype=None,
    put: Callable[[tuple, np.ndarray], jax.Array] | None = None,
) -> CLIPBundle:
    """Load a local Hugging Face CLIP folder (config, safetensors weights, tokenizer).

    Everything cheap is checked before any weights are read (config, weight files, tokenizer
    files), so a broken folder fails fast with one CheckpointFormatError line naming the file.
    ``.bin`` / pickle-only folders are refused without unpickling anything.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointFormatError(f"{path}: CLIP model folder does not exist")
    config = read_clip_config(path)
    find_weight_files(path)  # missing or pickle-only weights, before anything else is read
    check_tokenizer_files(path)
    preprocess = read_preprocess(path, config.vision_config.image_size)
    build = lambda: CLIPModel(config, dtype=compute_dtype, rngs=nnx.Rngs(0))  # noqa: E731
    model = load_module_weights(build, path, CLIP_MODEL_KEYS, dtype=param_dtype, put=put)
    return CLIPBundle(model, load_tokenizer(path), preprocess, config, path)


def load_clip_vision_model(
    folder: str | os.PathLike,
    *,
    with_projection: bool = False,
    compute_dtype=None,
    param_dtype=None,
    put: Callable[[tuple, np.ndarray], jax.Array] | None = None,
) -> CLIPVisionModel | CLIPVisionModelWithProjection:
    """A CLIPVisionModel(WithProjection) folder (e.g. an image encoder) -> the vision tower."""
    path = Path(folder)
    config = _parse(path / "config.json", CLIPVisionConfig.from_transformers)
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    build = lambda: cls(config, dtype=compute_dtype, rngs=nnx.Rngs(0))  # noqa: E731
    return load_module_weights(build, path, CLIP_VISION_KEYS, dtype=param_dtype, put=put)


__all__ = [
    "CLIP_VISION_KEYS", "CLIP_MODEL_KEYS", "CLIPBundle", "load_clip_model", "load_clip_vision_model",
    "read_clip_config", "read_preprocess",
]
