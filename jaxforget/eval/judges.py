"""Judges: what decides whether a concept is in a generated image. One small interface, two
implementations: the toy world's classifier (here) and a CLIP zero-shot judge for real models
(``jaxforget.eval.clip_judge.CLIPJudge``, loaded lazily by ``load_judge("clip:<folder>")``).

The evaluator only ever calls the ``Judge`` protocol, so a judge is chosen by a config string.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from jaxforget.errors import ConfigError


@runtime_checkable
class Judge(Protocol):
    """What the evaluator needs of a judge.

    Images are float [N, H, W, 3] in [0, 1] at any resolution (a judge resizes to its own).

    - ``name``: identity of the judge's weights (e.g. "toyworld:<hash>"): part of every cache
      key, so results judged by another judge are never reused.
    - optional ``feature_kind``: "clip" when ``features`` are L2-normalized CLIP image embeddings
      (the evaluator then also reports CMMD). Without it, ``feature_kind(judge)`` infers "clip"
      from a name starting with "clip".
    - ``concept_names(domain)``: the concepts of a domain ("object", "style", ...) it can detect.
    - ``detect(images, concept, domain)``: bool [N], is the concept present in each image.
    - ``features(images)``: float [N, F] features (the Fréchet distance / CMMD input).
    - ``alignment(images, prompts)``: float [N], higher = better (NaN where undefined): how
      well image i matches prompts[i] (toy world: fraction of labels in [0, 1]; CLIP: CLIPScore).
    """

    name: str

    def concept_names(self, domain: str) -> tuple[str, ...]: ...

    def detect(self, images: np.ndarray, concept: str, domain: str) -> np.ndarray: ...

    def features(self, images: np.ndarray) -> np.ndarray: ...

    def alignment(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


def feature_kind(judge: Any) -> str:
    """The judge's ``feature_kind``, or "clip" for a judge named "clip..." that does not say."""
    kind = getattr(judge, "feature_kind", None)
    if kind:
        return str(kind)
    return "clip" if str(getattr(judge, "name", "")).startswith("clip") else ""


def _as_unit_images(images: Any) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """float [N, H, W, 3] -> [N, size, size, 3], bilinear with antialiasing (area-like when
    shrinking a 512 px SD image to a 32 px judge; exact pixel repeats are undone exactly)."""
    import jax

    if images.shape[1:3] == (size, size):
        return images
    out = jax.image.resize(images, (images.shape[0], size, size, 3), method="linear", antialias=True)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def _bucket(n: int, cap: int) -> int:
    # pad batches to a few fixed sizes (powers of two) so that the judge compiles a handful of
    # shapes, not one per subset size
    if n >= cap:
        return n
    b = 8
    while b < n:
        b *= 2
    return min(b, cap)


class ToyWorldJudge:
    """The toy world's object / style / colour classifier (``jaxforget.toyworld.judge``).

    ``detect`` is the argmax of the concept's head (object, style or colour) — top-1 accuracy,
    as UnlearnCanvas's classifiers; the object head's "none" class lets an unlearned model that
    draws nothing count as "no object". Images of another resolution are resized to the judge's
    (32 px). Predictions of the last few batches are memoized by content, so ``features`` and
    ``alignment`` on the same batch cost one forward pass.
    """

    feature_kind = "toyworld"

    def __init__(self, judge_dir: str | Path | None = None, *, catalogue: Any = None, batch_size: int = 256):
        from jaxforget.toyworld import judge as J
        from jaxforget.toyworld.catalogue import load_catalogue

        self._J = J
        self.folder = Path(judge_dir) if judge_dir is not None else J.DEFAULT_JUDGE_DIR
        self.model = J.load_judge(self.folder)
        self.config = self.model.config
        self.image_size = int(self.config.image_size)
        self.catalogue = catalogue if catalogue is not None else load_catalogue()
        self.batch_size = int(batch_size)
        digest = hashlib.sha256((self.folder / J.WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
        self.name = f"toyworld:{digest}"
        self._memo: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()

    def __repr__(self) -> str:
        return f"ToyWorldJudge({str(self.folder)!r}, name={self.name!r})"

    # -- raw predictions
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """judge_predict's outputs ({head}_logits, {head}_probs, features) for images of any size."""
        x = resize_images(_as_unit_images(images), self.image_size)
        key = hashlib.blake2b(x.tobytes(), digest_size=16).digest() + repr(x.shape).encode()
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        n = len(x)
        pad = _bucket(n, self.batch_size) - n
        if pad > 0:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        out = self._J.judge_predict(self.model, x, batch_size=self.batch_size)
        out = {k: v[:n] for k, v in out.items()}
        self._memo[key] = out
        while len(self._memo) > 4:
            self._memo.popitem(last=False)
        return out

    def predicted(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Argmax class names per head: {"object": str [N], "style": ..., "colour": ...}."""
        pred = self.predict(images)
        return {h: np.asarray(self.config.classes(h), dtype=object)[np.argmax(pred[f"{h}_logits"], -1)]
                for h in self._J.HEADS}

    # -- the Judge protocol
    def concept_names(self, domain: str) -> tuple[str, ...]:
        if domain == "object":
            return tuple(o for o in self.config.objects if o != self._J.NONE_OBJECT)
        if domain in ("style", "colour"):
            return tuple(self.config.classes(domain))
        raise ValueError(f"the toy-world judge has no {domain!r} head (object, style, colour)")

    def detect(self, images: np.ndarray, concept: str, domain: str) -> np.ndarray:
        if concept not in self.concept_names(domain):
            raise ValueError(f"the toy-world judge does not know the {domain} {concept!r}")
        return self.predicted(images)[domain] == concept

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict(images)["features"], dtype=np.float32)

    def alignment(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Per image: the fraction of the labels its prompt names that the judge recognizes.

        Labels (``catalogue.parse_prompt``): the object, the style, the colour, and "empty" (the
        object head must say "none"). A colour counts only when an object is also detected (no
        object, no colour). A prompt naming none of them scores NaN.
        """
        from jaxforget.toyworld.catalogue import parse_prompt

        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        names = self.predicted(images)
        out = np.full(len(prompts), np.nan, np.float32)
        cache: dict[str, Any] = {}
        for i, prompt in enumerate(prompts):
            labels = cache.get(prompt)
            if labels is None:
                labels = cache[prompt] = parse_prompt(prompt, self.catalogue)
            obj = names["object"][i]
            hits = []
            if labels.object is not None:
                hits.append(obj == labels.object)
            if labels.empty:
                hits.append(obj == self._J.NONE_OBJECT)
            if labels.style is not None:
                hits.append(names["style"][i] == labels.style)
            if labels.colour is not None:
                hits.append(obj != self._J.NONE_OBJECT and names["colour"][i] == labels.colour)
            if hits:
                out[i] = float(np.mean(hits))
        return out


def load_judge(spec: str | None = "toyworld", **kwargs: Any) -> Judge:
    """A judge from a config string.

    - "toyworld" (or None): the judge shipped with the package (jaxforget/assets/toyworld/judge).
    - "toyworld:<folder>": a toy-world judge folder (model.safetensors + config.json).
    - "clip:<folder>": ``jaxforget.eval.clip_judge.CLIPJudge(folder)``, a CLIP zero-shot judge
      for real models (imported only here, so the toy world never loads it).
    """
    spec = (spec or "toyworld").strip()
    kind, _, arg = spec.partition(":")
    if kind == "toyworld":
        return ToyWorldJudge(arg or None, **kwargs)
    if kind == "clip":
        if not arg:
            raise ConfigError("judge 'clip:<folder>' needs a CLIP model folder")
        from jaxforget.eval.clip_judge import CLIPJudge  # lazy: real-model judges only

        return CLIPJudge(arg, **kwargs)
    raise ConfigError(
        f"judge: unknown kind {kind!r} in {spec!r} (use 'toyworld', 'toyworld:<folder>' or 'clip:<folder>')")


__all__ = ["Judge", "ToyWorldJudge", "feature_kind", "load_judge", "resize_images"]
