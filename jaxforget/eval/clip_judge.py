"""A CLIP zero-shot judge for real models: detection, CMMD features and the CLIP score.

``CLIPJudge`` loads a local Hugging Face CLIP folder (``jaxforget.io.clip_model``) and answers the
judge protocol of ``jaxforget.eval.judges``:

- ``detect(images, concept, domain)``: zero-shot classification. Mode ``"argmax"`` (default):
  the image shows ``concept`` when the concept's text embedding is the most similar (cosine)
  among the labels of its domain. Mode ``"threshold"``: when cos(image, concept) exceeds
  cos(image, neutral prompt) by more than ``threshold``; use it when a domain has one label, or
  to ask "is it there at all" rather than "which one".
- ``features(images)``: L2-normalized image embeddings [N, P] (CMMD's inputs).
- ``alignment(images, prompts)``: the CLIP score 100·max(cos(image_i, prompt_i), 0) per image,
  as torchmetrics' CLIPScore (which reports the mean of these).
- ``concept_names(domain)``: the labels of a domain.

Label embeddings are prompt ensembles (Radford et al. 2021): each template filled with the
label, encoded, normalized, averaged and renormalized. Images are [N, H, W, 3] uint8 or float in
``value_range`` (the pipeline's output is float in [0, 1]); preprocessing (CLIP's resize, crop,
normalization) runs inside the same jitted call as the vision tower. Batches are padded to a
few fixed sizes so a run compiles a handful of programs at most, and the features of the last
few batches are memoized by content, so ``detect``, ``features`` and ``alignment`` on the same
images cost one vision forward pass.

``name`` is "clip:<model hash>:<settings hash>": the evaluator keys its caches on it, so results
of another CLIP model, or of other labels / templates / mode, are never reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxforget.errors import ConfigError
from jaxforget.io.clip_model import CLIPBundle, load_clip_model
from jaxforget.io.diffusers_folder import folder_hash, params_hash
from jaxforget.models.clip_vision import ImagePreprocess, l2_normalize, preprocess_images
from jaxforget.tokenizers import encode_prompts

DEFAULT_TEMPLATES = ("a photo of {}", "{}")
MODES = ("argmax", "threshold")
ANY_DOMAIN = "any"


# ----------------------------------------------------------------------------- jitted kernels
@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _image_embeds(graphdef, state, images, prep: ImagePreprocess, value_range: tuple[float, float]):
    model = nnx.merge(graphdef, state)
    pixels = preprocess_images(images, prep, value_range=value_range)
    return l2_normalize(model.get_image_features(pixels))


@functools.partial(jax.jit, static_argnums=0)
def _text_embeds(graphdef, state, ids):
    return l2_normalize(nnx.merge(graphdef, state).get_text_features(ids))


def _bucket(n: int, batch_size: int) -> int:
    """Padded batch size: ``batch_size``, or the next power of two for a smaller request."""
    return batch_size if n >= batch_size else 1 << max(n - 1, 0).bit_length()


def _run_batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    n = x.shape[0]
    b = _bucket(n, batch_size)
    out = []
    for start in range(0, n, b):
        chunk = x[start:start + b]
        k = chunk.shape[0]
        if k < b:  # pad with copies of the last row: same shapes, no recompilation
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - k, axis=0)])
        out.append(np.asarray(jax.device_get(fn(jnp.asarray(chunk))))[:k])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- labels
def labels_by_domain(
    labels: Mapping[str, Sequence[str]] | Sequence[str] | None = None, catalogue: Any = None
) -> dict[str, tuple[str, ...]]:
    """Domain -> label names, from an explicit mapping, a flat list (domain "any"), or any
    catalogue whose ``.concepts`` have ``name`` and ``domain`` (the toy world's Catalogue).
    Explicit labels win over the catalogue (the evaluator may pass its catalogue to every judge).
    Domain "any" defaults to every label of every domain."""
    out: dict[str, list[str]] = {}
    if isinstance(labels, Mapping):
        for domain, names in labels.items():
            if isinstance(names, str):
                raise ConfigError(f"CLIP judge: labels for domain {domain!r} must be a list, got a string")
            out[str(domain)] = [str(n) for n in names]
    elif labels is not None:
        if isinstance(labels, str):
            raise ConfigError("CLIP judge: labels must be a list of names, got a string")
        out[ANY_DOMAIN] = [str(n) for n in labels]
    elif catalogue is not None:
        for c in catalogue.concepts:
            out.setdefault(str(c.domain), []).append(str(c.name))
    else:
        raise ConfigError("CLIP judge: needs labels (a list or per-domain lists) or a catalogue")
    if ANY_DOMAIN not in out:
        out[ANY_DOMAIN] = [n for names in out.values() for n in names]
    result = {}
    for domain, names in out.items():
        names = list(dict.fromkeys(" ".join(n.split()) for n in names))  # normalized, deduplicated
        if not names or any(not n for n in names):
            raise ConfigError(f"CLIP judge: domain {domain!r} has no labels or an empty label")
        result[domain] = tuple(names)
    return result


# ----------------------------------------------------------------------------- judge
class CLIPJudge:
    """Zero-shot CLIP judge over a local Hugging Face CLIP folder (see module docstring)."""

    feature_kind = "clip"  # features are L2-normalized CLIP image embeddings: CMMD applies
    MEMO_SIZE = 4

    def __init__(
        self,
        folder: str | os.PathLike | CLIPBundle,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        labels: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
        *,
        catalogue: Any = None,
        mode: str = "argmax",
        threshold: float = 0.0,
        neutral_prompt: str = "a photo",
        batch_size: int = 32,
        value_range: tuple[float, float] = (0.0, 1.0),
        compute_dtype=None,
    ):
        if mode not in MODES:
            raise ConfigError(f"CLIP judge: mode must be one of {', '.join(MODES)}, got {mode!r}")
        templates = tuple(str(t) for t in templates)
        if not templates or any("{}" not in t for t in templates):
            raise ConfigError(f"CLIP judge: every template needs a '{{}}' placeholder, got {list(templates)}")
        if int(batch_size) <= 0:
            raise ConfigError(f"CLIP judge: batch_size must be positive, got {batch_size}")
        self.bundle = folder if isinstance(folder, CLIPBundle) else load_clip_model(folder, compute_dtype=compute_dtype)
        self.templates = templates
        self.labels = labels_by_domain(labels, catalogue)
        self.mode = mode
        self.threshold = float(threshold)
        self.neutral_prompt = neutral_prompt
        self.batch_size = int(batch_size)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self._graphdef, self._state = nnx.split(self.bundle.model)
        self._text_cache: dict[str, np.ndarray] = {}
        self._label_cache: dict[str, np.ndarray] = {}
        self._memo: OrderedDict[bytes, np.ndarray] = OrderedDict()
        path = self.bundle.path
        model_id = folder_hash(path) if path is not None and Path(path).is_dir() else params_hash(self.bundle.model)
        settings = json.dumps({"templates": self.templates, "labels": self.labels, "mode": mode,
                               "threshold": self.threshold, "neutral": neutral_prompt,
                               "preprocess": repr(self.bundle.preprocess)}, sort_keys=True)
        self.name = f"clip:{model_id[:12]}:{hashlib.sha256(settings.encode()).hexdigest()[:8]}"

    def __repr__(self) -> str:
        return f"CLIPJudge({str(self.bundle.path)!r}, name={self.name!r}, mode={self.mode!r})"

    # --------------------------------------------------------------------- protocol
    def concept_names(self, domain: str) -> tuple[str, ...]:
        try:
            return self.labels[domain]
        except KeyError:
            raise ConfigError(
                f"CLIP judge: unknown domain {domain!r} (known: {', '.join(sorted(self.labels))})"
            ) from None

    def features(self, images: np.ndarray | jax.Array) -> np.ndarray:
        """L2-normalized image embeddings, float32 [N, projection_dim] (for CMMD)."""
        x = np.asarray(images)
        if x.ndim not in (3, 4) or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty image batch [N, H, W, C], got shape {x.shape}")
        key = hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest() + repr(
            (x.shape, x.dtype.str)).encode()
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key].copy()
        prep, vr = self.bundle.preprocess, self.value_range
        fn = lambda chunk: _image_embeds(self._graphdef, self._state, chunk, prep, vr)  # noqa: E731
        feats = _run_batched(fn, x, self.batch_size).astype(np.float32)
        self._memo[key] = feats
        while len(self._memo) > self.MEMO_SIZE:
            self._memo.popitem(last=False)
        return feats.copy()

    def detect(self, images: np.ndarray | jax.Array, concept: str, domain: str) -> np.ndarray:
        """bool [N]: does each image show ``concept`` (see the class's ``mode``)?"""
        return self.detect_from_features(self.features(images), concept, domain)

    def alignment(self, images: np.ndarray | jax.Array, prompts: Sequence[str] | str) -> np.ndarray:
        """CLIP score per image, float32 [N]: 100·max(cos(image_i, prompt_i), 0). One prompt is
        shared by all images; otherwise one prompt per image."""
        feats = self.features(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1:
            prompts = prompts * len(feats)
        if len(prompts) != len(feats):
            raise ValueError(f"alignment: {len(feats)} images but {len(prompts)} prompts")
        text = self.text_features(prompts)
        return (100.0 * np.maximum((feats * text).sum(-1), 0.0)).astype(np.float32)

    # --------------------------------------------------------------------- the rest
    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalized text embeddings [len(prompts), P] (cached per prompt)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            ids = encode_prompts(self.bundle.tokenizer, missing, self.bundle.max_length)
            emb = _run_batched(functools.partial(_text_embeds, self._graphdef, self._state), ids, self.batch_size)
            self._text_cache.update(zip(missing, emb.astype(np.float32)))
        return np.stack([self._text_cache[p] for p in prompts])

    def label_embeddings(self, domain: str) -> np.ndarray:
        """Prompt-ensembled label embeddings of a domain, [L, P], normalized."""
        if domain not in self._label_cache:
            names = self.concept_names(domain)
            texts = [t.replace("{}", name) for name in names for t in self.templates]
            emb = self.text_features(texts).reshape(len(names), len(self.templates), -1).mean(axis=1)
            self._label_cache[domain] = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return self._label_cache[domain]

    def similarities(self, images: np.ndarray | jax.Array, domain: str) -> np.ndarray:
        """Cosine similarity of each image to each label of ``domain``, [N, L]."""
        return self.features(images) @ self.label_embeddings(domain).T

    def classify(self, images: np.ndarray | jax.Array, domain: str) -> list[str]:
        """The most similar label of ``domain`` for each image."""
        names = self.concept_names(domain)
        return [names[i] for i in np.argmax(self.similarities(images, domain), axis=-1)]

    def detect_from_features(self, feats: np.ndarray, concept: str, domain: str) -> np.ndarray:
        """``detect`` on precomputed ``features`` (so one forward pass serves several questions)."""
        concept = " ".join(str(concept).split())
        if self.mode == "threshold":
            target = self._ensemble(concept)
            neutral = self.text_features([self.neutral_prompt])[0]
            return (feats @ target - feats @ neutral) > self.threshold
        names = self.concept_names(domain)
        if concept not in names:
            raise ConfigError(
                f"CLIP judge: concept {concept!r} is not a label of domain {domain!r} (labels: {', '.join(names)})"
            )
        if len(names) < 2:
            raise ConfigError(
                f"CLIP judge: domain {domain!r} has a single label; argmax detection needs >= 2 "
                "(add labels or use mode='threshold')"
            )
        return np.argmax(feats @ self.label_embeddings(domain).T, axis=-1) == names.index(concept)

    def _ensemble(self, name: str) -> np.ndarray:
        emb = self.text_features([t.replace("{}", name) for t in self.templates]).mean(axis=0)
        return emb / max(float(np.linalg.norm(emb)), 1e-12)


__all__ = ["CLIPJudge", "DEFAULT_TEMPLATES", "labels_by_domain"]
