"""Evaluate a model (or a snapshot's UNet) on the concept catalogue: generate every concept's
evaluation prompts with fixed seeds, let a judge read the images, and score them.

- Generation: all (prompt, image index) pairs in fixed-size batches through one jitted sampler
  (``pipeline.generate_jit``); the last batch is padded, so one evaluation compiles once and
  every later evaluation with the same config reuses it. Each image has its own PRNG key,
  folded from (``cfg.seed``, a hash of the prompt text, image index): an image depends on
  neither the batch size nor the set of concepts evaluated, and a prompt shared by two concepts
  ("a circle in plain style") is generated once.
- Judging streams batch by batch (the next batch is sampled while the judge reads this one), so
  memory holds features and grid images, not every 512 px image of an SD evaluation.
- Caching: with ``cache_dir`` and ``cache_key`` (what identifies the networks, e.g. a snapshot's
  params hash), the generated-and-judged part (detection counts, features, grid images) is
  stored; the key is combined with the eval config, the judge and the prompt list, so a changed
  config never reads a stale entry. The metrics are recomputed from it every time (they also
  depend on ``removed`` / ``current`` and the reference set, and cost milliseconds).
- FID proxy: judge features of the images of the prompts that should still be drawn (prompts of
  removed concepts left out) against rendered scenes of the same prompts (``retained_features``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxforget import pipeline as P
from jaxforget.errors import ConfigError
from jaxforget.eval.judges import feature_kind
from jaxforget.eval.metrics import cmmd, continual_metrics, frechet_distance

CACHE_VERSION = 1
# the sampler every evaluation batch goes through (module-level so tests can count calls)
_generate_jit = P.generate_jit


@dataclass(frozen=True)
class EvalConfig:
    images_per_prompt: int = 8
    prompts_per_concept: int = 0  # 0 = all of a concept's evaluation prompts, else the first N
    seed: int = 1234  # root of the per-image keys; training never uses it
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    sampler: str = "ddim"
    batch_size: int = 64
    concepts: tuple[str, ...] = ()  # () = every catalogue concept
    fid_reference_images: int = 256  # rendered toy-world references for the FID proxy; 0 = off
    grid_columns: int = 8  # images kept per concept for the report grid (its first prompt)

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ConfigError(f"eval.images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if self.prompts_per_concept < 0:
            raise ConfigError(f"eval.prompts_per_concept must be >= 0 (0 = all), got {self.prompts_per_concept}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.sampler not in P.SAMPLERS:
            raise ConfigError(f"eval.sampler: {self.sampler!r} is not supported (use one of {', '.join(P.SAMPLERS)})")
        if self.num_inference_steps < 1:
            raise ConfigError(f"eval.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.fid_reference_images < 0 or self.grid_columns < 0:
            raise ConfigError("eval.fid_reference_images and eval.grid_columns must be >= 0")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def digest(self) -> str:
        """What the generated images depend on (batch_size and grid size excluded: they do not
        change any image or score)."""
        d = self.to_json()
        d.pop("batch_size")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalResult:
    detection: dict[str, float]  # concept -> fraction of its images in which the judge finds it
    per_prompt: dict[str, dict[str, float]]  # concept -> prompt -> detection rate
    alignment: dict[str, float]  # prompt -> mean alignment score of its images
    metrics: dict[str, float]  # UA IRA CRA NRA ACC fid_proxy alignment (cmmd with a CLIP judge)
    images: dict[str, np.ndarray]  # concept -> uint8 [cols, H, W, 3]: its first prompt, seeds 0..
    features: np.ndarray  # [N, F] judge features of every generated image (a later reference)
    prompts: tuple[str, ...]  # generation order: features row i*images_per_prompt + j = prompts[i], seed j
    num_images: int
    seconds: float  # wall time of this call
    from_cache: bool = False
    cache_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)  # generation / judging times, compile count

    def row(self, **extra: Any) -> dict[str, Any]:
        """One report row: ``extra`` (e.g. k, method, target), the metrics, and the per-concept
        detection rates (``detection``: the report's per-concept table)."""
        return {**extra, **self.metrics, "detection": {c: float(v) for c, v in self.detection.items()}}


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class _Plan:
    concepts: tuple[Any, ...]  # catalogue Concept objects
    prompts: dict[str, tuple[str, ...]]  # concept -> its evaluated prompts
    unique: tuple[str, ...]  # every prompt once, in first-use order
    users: dict[str, tuple[str, ...]]  # prompt -> concepts that evaluate it


def _concept(catalogue: Any, name: str) -> Any:
    for c in catalogue.concepts:
        if c.name == name:
            return c
    known = ", ".join(c.name for c in catalogue.concepts)
    raise ConfigError(f"eval.concepts: unknown concept {name!r}; known: {known}")


def _plan(catalogue: Any, cfg: EvalConfig) -> _Plan:
    names = cfg.concepts or tuple(c.name for c in catalogue.concepts)
    concepts = tuple(_concept(catalogue, n) for n in dict.fromkeys(names))
    prompts, users = {}, {}
    for c in concepts:
        ps = tuple(c.eval_prompts[: cfg.prompts_per_concept] if cfg.prompts_per_concept else c.eval_prompts)
        if not ps:
            raise ConfigError(f"concept {c.name!r} has no evaluation prompts")
        prompts[c.name] = ps
        for p in ps:
            users.setdefault(p, []).append(c.name)
    return _Plan(concepts, prompts, tuple(users), {p: tuple(v) for p, v in users.items()})


def prompt_seed(prompt: str) -> int:
    """A stable 31-bit id of a prompt text (its images' keys are folded from it)."""
    return zlib.crc32(prompt.encode("utf-8")) & 0x7FFFFFFF


@jax.jit
def _image_keys(seed: jax.Array, prompt_ids: jax.Array, image_idx: jax.Array) -> jax.Array:
    root = jax.random.key(seed)
    return jax.vmap(lambda p, j: jax.random.fold_in(jax.random.fold_in(root, p), j))(prompt_ids, image_idx)


# ----------------------------------------------------------------------------- cache
def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:64]


def _entry_dir(cache_dir: Path, cache_key: str, cfg: EvalConfig, judge: Any, plan: _Plan) -> Path:
    ident = json.dumps({"v": CACHE_VERSION, "key": cache_key, "cfg": cfg.digest(), "judge": judge.name,
                        "prompts": {c: list(ps) for c, ps in plan.prompts.items()}}, sort_keys=True)
    return cache_dir / f"{_safe(cache_key)}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _none_to_nan(x: Any) -> Any:
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _none_to_nan(v) for k, v in x.items()}
    return x


def _write_entry(path: Path, judged: dict, arrays: dict[str, np.ndarray]) -> None:
    # write into a temp folder, then rename: a crash never leaves a half-written entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    (tmp / "result.json").write_text(json.dumps(_nan_to_none(judged), indent=1, allow_nan=False) + "\n")
    np.savez_compressed(tmp / "arrays.npz", **arrays)
    try:
        os.replace(tmp, path)
    except OSError:  # another process wrote it first: keep theirs
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def _read_entry(path: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    try:
        judged = _none_to_nan(json.loads((path / "result.json").read_text()))
        with np.load(path / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None  # missing or unreadable: evaluate again
    return judged, arrays


# ----------------------------------------------------------------------------- references
_REFERENCE_MEMO: dict[str, np.ndarray] = {}


def reference_features(
    judge: Any, catalogue: Any, prompts: Sequence[str], n: int, *, cache_dir: str | Path | None = None
) -> np.ndarray:
    """Judge features of ``n`` freshly rendered toy-world scenes for ``prompts`` (cycled), with
    held-out seeds: the FID proxy's reference set. Memoized in memory and, with ``cache_dir``,
    on disk (keyed by judge, prompts, n and image size)."""
    from jaxforget.toyworld.catalogue import labels_to_spec, parse_prompt
    from jaxforget.toyworld.render import EVAL_SEED_BASE, render_batch

    size = int(catalogue.image_size)
    ident = json.dumps({"judge": judge.name, "prompts": list(prompts), "n": n, "size": size,
                        "catalogue": str(getattr(catalogue, "source", ""))})
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    if key in _REFERENCE_MEMO:
        return _REFERENCE_MEMO[key]
    path = Path(cache_dir) / f"reference-{key}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        feats = np.load(path)
    else:
        # seeds far above the evaluation scenes' (catalogue.eval_examples uses base + i * 10_000 + j)
        labels = {p: parse_prompt(p, catalogue) for p in prompts}
        specs = [labels_to_spec(labels[prompts[i % len(prompts)]], EVAL_SEED_BASE + 2**29 + i, catalogue)
                 for i in range(n)]
        images = render_batch(specs, size).astype(np.float32) / 255.0
        feats = np.concatenate([judge.features(images[i:i + 256]) for i in range(0, n, 256)])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, feats)
    _REFERENCE_MEMO[key] = feats
    return feats


def retained_features(
    features: np.ndarray, judge: Any, catalogue: Any, cfg: EvalConfig, gone: Sequence[str], *,
    reference: np.ndarray | None = None, cache_dir: str | Path | None = None, plan: Any = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The FID proxy's two feature sets, restricted to the prompts that still should be drawn:
    prompts evaluated for, or mentioning, a removed concept (``gone``) are left out, since the
    unlearned model is meant to draw something else there (counting them would charge every
    successful removal as a quality loss). Returns (generated features of the kept prompts,
    reference: rendered scenes of the kept prompts for a toy-world catalogue, or the rows of a
    given ``reference`` aligned with ``features`` (e.g. the base model's), or the given one as is)."""
    plan = plan or _plan(catalogue, cfg)
    n = cfg.images_per_prompt
    words = [g.lower() for g in gone if g]
    keep = [i for i, p in enumerate(plan.unique)
            if not {u.lower() for u in plan.users[p]} & set(words)
            and not any(re.search(rf"\b{re.escape(w)}\b", p.lower()) for w in words)]
    aligned = len(features) == len(plan.unique) * n
    rows = (np.concatenate([np.arange(i * n, (i + 1) * n) for i in keep]) if keep else np.zeros(0, int)) \
        if aligned else np.arange(len(features))
    if reference is None:
        if cfg.fid_reference_images > 1 and is_toyworld(catalogue) and keep:
            reference = reference_features(judge, catalogue, [plan.unique[i] for i in keep],
                                           cfg.fid_reference_images, cache_dir=cache_dir)
    elif aligned and len(reference) == len(features):
        reference = reference[rows]
    return features[rows], reference


def is_toyworld(catalogue: Any) -> bool:
    from jaxforget.toyworld.catalogue import Catalogue

    return isinstance(catalogue, Catalogue)


# ----------------------------------------------------------------------------- generation + judging
def _generate_and_judge(model: Any, nets: Any, judge: Any, plan: _Plan, cfg: EvalConfig,
                        progress: bool) -> tuple[dict, dict[str, np.ndarray]]:
    jobs = [(pi, j) for pi in range(len(plan.unique)) for j in range(cfg.images_per_prompt)]
    total = len(jobs)
    bsz = min(cfg.batch_size, total)  # one fixed shape per evaluation: pad the last batch
    n_batches = -(-total // bsz)
    zero_uncond = model.is_sdxl and model.force_zeros_for_empty_prompt
    spec = P.make_spec(model, sampler=cfg.sampler, num_inference_steps=cfg.num_inference_steps,
                       guidance_scale=cfg.guidance_scale, zero_uncond=zero_uncond)
    all_ids = P.tokenize_prompts(model, list(plan.unique))
    uncond_ids = P.tokenize_prompts(model, [""])
    pids = np.array([prompt_seed(p) for p in plan.unique], np.uint32)
    domain = {c.name: c.domain for c in plan.concepts}

    def launch(b: int):
        part = jobs[b * bsz:(b + 1) * bsz]
        part_full = part + [part[0]] * (bsz - len(part))  # padding: repeats, discarded
        pi = np.array([p for p, _ in part_full])
        ji = np.array([j for _, j in part_full], np.uint32)
        ids = P.PromptIds(all_ids.ids[pi], None if all_ids.ids_2 is None else all_ids.ids_2[pi])
        keys = _image_keys(np.uint32(cfg.seed), pids[pi], ji)
        out = _generate_jit(nets, ids, uncond_ids, keys, schedule=model.schedule, spec=spec)
        return out.images, part

    hits = {c: {p: 0 for p in ps} for c, ps in plan.prompts.items()}
    align_sum = {p: 0.0 for p in plan.unique}
    align_cnt = {p: 0 for p in plan.unique}
    feats: list[np.ndarray] = []
    grid: dict[str, list[np.ndarray | None]] = {
        c.name: [None] * min(cfg.grid_columns, cfg.images_per_prompt) for c in plan.concepts}
    first_prompt = {c: ps[0] for c, ps in plan.prompts.items()}
    t_gen = t_judge = 0.0
    nonfinite = 0

    bar = None
    if progress:
        from jaxforget.progress import progress_bar

        bar = progress_bar(total=total, desc="evaluate", unit="img")
    t0 = time.perf_counter()
    pending = launch(0)
    for b in range(n_batches):
        nxt = launch(b + 1) if b + 1 < n_batches else None  # async dispatch: samples while we judge
        images, part = pending
        x = np.asarray(jax.device_get(images), dtype=np.float32)[: len(part)]
        bad = ~np.isfinite(x).all(axis=(1, 2, 3))
        if bad.any():  # a diverged model: judge its NaN images as black, and say so
            nonfinite += int(bad.sum())
            x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
        t1 = time.perf_counter()
        t_gen += t1 - t0
        prompts = [plan.unique[pi] for pi, _ in part]
        feats.append(np.asarray(judge.features(x), np.float32))
        scores = np.asarray(judge.alignment(x, prompts), np.float64)
        for i, p in enumerate(prompts):
            if math.isfinite(scores[i]):
                align_sum[p] += float(scores[i])
                align_cnt[p] += 1
        by_concept: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            for c in plan.users[p]:
                by_concept.setdefault(c, []).append(i)
        for c, idx in by_concept.items():
            # judge the whole batch and pick the concept's images: the judge memoizes its forward
            # pass by content, so every concept reuses the one pass ``features`` made (judging
            # each subset x[idx] ran the network once per concept: slower than the sampling)
            found = np.asarray(judge.detect(x, c, domain[c]), bool)[idx]
            for i, f in zip(idx, found):
                hits[c][prompts[i]] += int(f)
        for i, (pi, j) in enumerate(part):
            p = plan.unique[pi]
            for c in plan.users[p]:
                if p == first_prompt[c] and j < len(grid[c]):
                    grid[c][j] = np.clip(np.rint(x[i] * 255.0), 0, 255).astype(np.uint8)
        t0 = time.perf_counter()
        t_judge += t0 - t1
        if bar is not None:
            bar.update(len(part))
        pending = nxt
    if bar is not None:
        bar.close()

    n = cfg.images_per_prompt
    judged = {
        "detection": {c: sum(h.values()) / (n * len(h)) for c, h in hits.items()},
        "per_prompt": {c: {p: v / n for p, v in h.items()} for c, h in hits.items()},
        "alignment": {p: (align_sum[p] / align_cnt[p]) if align_cnt[p] else math.nan for p in plan.unique},
        "alignment_mean": (sum(align_sum.values()) / max(sum(align_cnt.values()), 1))
        if sum(align_cnt.values()) else math.nan,
        "num_images": total,
        "concepts": [c.name for c in plan.concepts],
        # on one CPU device the judge's jitted forward queues behind the next batch's sampling
        # (dispatched just before it), so judge_s there includes that wait: the sum is the cost
        "info": {"generate_s": round(t_gen, 3), "judge_s": round(t_judge, 3), "batches": n_batches,
                 "batch_size": bsz, "nonfinite_images": nonfinite},
        "cfg": cfg.to_json(),
        "judge": judge.name,
    }
    arrays = {"features": np.concatenate(feats)}
    for i, c in enumerate(plan.concepts):
        arrays[f"grid_{i}"] = np.stack(grid[c.name]) if grid[c.name] else np.zeros((0, 1, 1, 3), np.uint8)
    return judged, arrays


def _networks(model: Any, nets: Any, unet_state: Any) -> Any:
    if nets is not None and unet_state is not None:
        raise ValueError("pass either nets or unet_state, not both")
    if unet_state is not None:
        from flax import nnx

        graphdef = nnx.split(model.unet)[0]
        return model.networks._replace(unet=nnx.merge(graphdef, unet_state))
    return nets if nets is not None else model.networks


def evaluate_model(
    model: Any,
    judge: Any,
    catalogue: Any,
    *,
    removed: Sequence[tuple[str, str]] = (),
    current: tuple[str, str] | None = None,
    cfg: EvalConfig = EvalConfig(),
    nets: Any = None,
    unet_state: Any = None,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    reference: np.ndarray | None = None,
    progress: bool = False,
) -> EvalResult:
    """Generate, judge and score ``model`` (a ``pipeline.DiffusionModel``) on the catalogue.

    ``nets`` (a ``pipeline.Networks``) or ``unet_state`` (an ``nnx.State`` for the model's UNet
    graph, e.g. a snapshot's params) replaces the model's own networks. ``removed`` / ``current``:
    the requests applied so far, as (concept, domain) (see ``metrics.continual_metrics``).
    ``reference``: judge features [M, F] to compare against (e.g. the base model's
    ``EvalResult.features`` for a real model); by default, with a toy-world catalogue, the
    features of ``cfg.fid_reference_images`` freshly rendered scenes of the evaluated prompts.
    Without either, ``fid_proxy`` is NaN. ``cache_dir`` + ``cache_key``: see the module doc;
    ``cache_key`` must identify the networks (e.g. ``io.diffusers_folder.params_hash(unet)``).
    """
    t_start = time.perf_counter()
    plan = _plan(catalogue, cfg)
    entry = None
    if cache_dir is not None and cache_key:
        entry = _entry_dir(Path(cache_dir), cache_key, cfg, judge, plan)
    cached = _read_entry(entry) if entry is not None else None
    if cached is not None:
        judged, arrays = cached
    else:
        judged, arrays = _generate_and_judge(model, _networks(model, nets, unet_state), judge, plan, cfg, progress)
        if entry is not None:
            _write_entry(entry, judged, arrays)

    features = arrays["features"]
    metrics = continual_metrics(judged["detection"], removed, current, catalogue)
    gone = [c for c, _ in removed] + ([current[0]] if current else [])
    feats, ref = retained_features(features, judge, catalogue, cfg, gone, reference=reference, cache_dir=cache_dir,
                                   plan=plan)
    ok = ref is not None and len(ref) > 1 and len(feats) > 1
    metrics["fid_proxy"] = frechet_distance(feats, ref) if ok else math.nan
    if feature_kind(judge) == "clip":
        metrics["cmmd"] = cmmd(feats, ref) if ok else math.nan
    metrics["alignment"] = float(judged["alignment_mean"])
    return EvalResult(
        detection=dict(judged["detection"]),
        per_prompt={c: dict(v) for c, v in judged["per_prompt"].items()},
        alignment=dict(judged["alignment"]),
        metrics=metrics,
        images={c.name: arrays[f"grid_{i}"] for i, c in enumerate(plan.concepts)},
        features=features,
        prompts=plan.unique,
        num_images=int(judged["num_images"]),
        seconds=time.perf_counter() - t_start,
        from_cache=cached is not None,
        cache_path=entry,
        info=dict(judged.get("info", {})),
    )


__all__ = ["EvalConfig", "EvalResult", "evaluate_model", "is_toyworld", "prompt_seed", "reference_features",
           "retained_features"]
