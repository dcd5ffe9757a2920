"""Robustness of unlearning: an adversarial soft-prompt attack on a removed concept.

In the style of UnlearnDiffAtk (Zhang et al., ECCV 2024): the *base* model (the teacher) draws
the target concept; a few learnable embedding vectors (a prefix) are prepended to the target
prompt and optimized so that the *unlearned* UNet, conditioned on the prefixed prompt, denoises
noised teacher latents as the base model does with the plain prompt. Then the unlearned model
generates with the optimized prompt, a judge reads the images, and the attack success rate is
the fraction judged as the target concept (beside the rate without the prefix, same seeds).

Where the prefix lives: in the text encoder's *input* token embeddings, right after the
start-of-text token (``[BOS, p_1 .. p_n, prompt tokens, EOS, pad ...]``, the last ``n`` padding
positions dropped so the sequence stays 77 long; position embeddings and the causal mask apply
as to real tokens). This is the space UnlearnDiffAtk searches (it then projects to real tokens;
we keep the continuous vectors, a stronger attack, so a success rate here is an upper bound on
what a discrete-token attacker reaches). The prefix passes through the frozen text encoder, so
it cannot produce a context the encoder could never emit, unlike a vector written straight into
the UNet's cross-attention context. SDXL gets one prefix per text encoder.

The prefix is parameterized as ``scale * u`` with ``scale`` the standard deviation of the
token-embedding table: Adam's step (``lr``) is then in units of a typical embedding entry, so
one default serves models whose embeddings differ in scale. ``u`` starts at the embeddings of
random vocabulary tokens (seeded).

Objective per step (``objective="teacher"``, the default): ``‖ε_unl(x_t, t, τ(prefix ⊕ p)) −
ε_base(x_t, t, τ(p))‖²`` with ``x_t`` a teacher latent noised at ``t ~ U[t_min, t_max]``;
``objective="noise"`` replaces the teacher's prediction with the true noise ε (UnlearnDiffAtk's
diffusion-classifier loss). The whole optimization (``steps`` Adam updates) is one jitted
``lax.scan``: one compile per shape, reused for every concept of the same prompt count.

Seeds: teacher images, prefix init, training noise and evaluation images use keys folded from
``cfg.seed``, a purpose and the prompt text, so a concept's result depends on neither the order
of concepts nor other concepts. Evaluation images use *other* seeds than the teacher images:
the attack must regenerate the concept, not replay the teacher's noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxforget import pipeline as P
from jaxforget import schedulers as S
from jaxforget.distributed import runtime_jit
from jaxforget.errors import ConfigError
from jaxforget.models.clip import causal_mask, pooled_positions
from jaxforget.models.layers import cast

OBJECTIVES = ("teacher", "noise")
ATTACK_CACHE_VERSION = 1
# key purposes (folded into the root key)
_TEACHER, _INIT, _TRAIN, _EVAL = 11, 12, 13, 14


@dataclass(frozen=True)
class AttackConfig:
    """Knobs of the soft-prompt attack. Defaults are sized for the toy world on a CPU (well under
    a minute per concept). ``enabled`` is read by the evaluation hook and the benchmark only:
    ``soft_prompt_attack`` always runs when called."""

    enabled: bool = False  # evaluation hook: attack every removed concept at every evaluation
    n_prefix: int = 5  # learnable embedding vectors prepended to the prompt (UnlearnDiffAtk: 5 tokens)
    steps: int = 200  # Adam updates
    lr: float = 0.05  # Adam step size, in units of the token-embedding table's std
    batch_size: int = 8  # noised teacher latents per update
    images: int = 8  # teacher images per target prompt (the attack's data)
    eval_images: int = 8  # images judged per target prompt, without and with the prefix
    prompts_per_concept: int = 1  # attack_concepts: the first N evaluation prompts of each concept
    seed: int = 0
    t_min: int = 0
    t_max: int = 999  # clipped to the schedule's last training timestep
    objective: str = "teacher"  # teacher: match ε_base; noise: match the true ε
    # sampling of teacher and judged images (the evaluation hook uses the evaluation's values)
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    sampler: str = "ddim"

    def __post_init__(self) -> None:
        for name in ("n_prefix", "steps", "batch_size", "images", "eval_images", "prompts_per_concept",
                     "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"attack.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"attack.lr must be > 0, got {self.lr}")
        if not 0 <= self.t_min <= self.t_max:
            raise ConfigError(f"attack: need 0 <= t_min <= t_max, got {self.t_min}, {self.t_max}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"attack.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.sampler not in P.SAMPLERS:
            raise ConfigError(f"attack.sampler: {self.sampler!r} is not supported (use one of {', '.join(P.SAMPLERS)})")

    def digest(self) -> str:
        """What a result depends on (``enabled`` and ``prompts_per_concept`` excluded: the
        caller's prompt list is hashed separately)."""
        d = dataclasses.asdict(self)
        d.pop("enabled")
        d.pop("prompts_per_concept")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class AttackResult:
    concept: str
    domain: str
    prompts: tuple[str, ...]  # target prompts (what the teacher draws)
    attack_prompts: tuple[str, ...]  # what the prefix is prepended to (usually the same)
    teacher_rate: float  # base model's images of the target prompts judged as the concept
    before: float  # unlearned model, attack prompts without the prefix
    after: float  # unlearned model, attack prompts with the optimized prefix: the success rate
    loss_start: float  # mean objective over the first 10 steps
    loss_end: float  # ... and the last 10
    seconds: float
    images: dict[str, np.ndarray]  # "teacher" / "before" / "after": uint8 [n, H, W, 3], first prompt
    prefix: tuple[np.ndarray, ...]  # the optimized embeddings [n_prefix, D], one per text encoder
    from_cache: bool = False

    @property
    def success(self) -> float:
        return self.after

    def summary(self) -> dict[str, Any]:
        return {"concept": self.concept, "domain": self.domain, "prompts": list(self.prompts),
                "attack_prompts": list(self.attack_prompts), "teacher_rate": self.teacher_rate,
                "before": self.before, "after": self.after, "loss_start": self.loss_start,
                "loss_end": self.loss_end, "seconds": self.seconds}


# ----------------------------------------------------------------------------- prefixed text encoding
def _transformer_with_prefix(tm: Any, ids: jax.Array, prefix: jax.Array) -> tuple[jax.Array, jax.Array, list]:
    """A ``CLIPTextTransformer`` forward with ``prefix`` [n, D] inserted after the first token:
    (last_hidden_state, pooled output, hidden states). Same ops as the module's own forward."""
    emb = tm.embeddings
    tok = emb.token_embedding(ids)
    b, seq = ids.shape
    n = prefix.shape[0]
    pre = jnp.broadcast_to(prefix.astype(tok.dtype), (b, n, tok.shape[-1]))
    x = jnp.concatenate([tok[:, :1], pre, tok[:, 1:seq - n]], axis=1)
    x = cast(x + emb.position_embedding.embedding[...][:seq][None], emb.dtype)
    mask = causal_mask(seq)
    hidden = [x]
    for layer in tm.encoder.layers:
        x = layer(x, mask)
        hidden.append(x)
    last = tm.final_layer_norm(x)
    # the end-of-text token moved n places right (callers check it is still in the sequence)
    pos = pooled_positions(ids, tm.config.eos_token_id) + n
    pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
    return last, pooled, hidden


def encode_with_prefix(nets: P.Networks, prompt_ids: P.PromptIds, prefix: tuple[jax.Array, ...] | None,
                       clip_skip: int | None = None) -> P.PromptEmbeds:
    """``pipeline.encode_prompt_ids`` with learnable token embeddings after the start token.

    ``prefix``: one array [n, D_i] per text encoder (SD: one, SDXL: two), or None for the plain
    encoding. An empty prefix ([0, D]) gives exactly ``encode_prompt_ids``; a prefix equal to
    the embeddings of real tokens gives the encoding of the prompt with those words in front.
    """
    if prefix is None:
        return P.encode_prompt_ids(nets, prompt_ids, clip_skip)
    ids = jnp.asarray(prompt_ids.ids, jnp.int32)
    if nets.text_encoder_2 is None:
        last, _, hidden = _transformer_with_prefix(nets.text_encoder.text_model, ids, prefix[0])
        if clip_skip is None:
            return P.PromptEmbeds(last)
        return P.PromptEmbeds(nets.text_encoder.text_model.final_layer_norm(hidden[-(clip_skip + 1)]))
    if prompt_ids.ids_2 is None or len(prefix) != 2:
        raise ValueError("SDXL needs ids and a prefix for both text encoders")
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    _, _, h1 = _transformer_with_prefix(nets.text_encoder.text_model, ids, prefix[0])
    _, pooled2, h2 = _transformer_with_prefix(nets.text_encoder_2.text_model,
                                              jnp.asarray(prompt_ids.ids_2, jnp.int32), prefix[1])
    context = jnp.concatenate([h1[layer], h2[layer].astype(h1[layer].dtype)], axis=-1)
    return P.PromptEmbeds(context, nets.text_encoder_2.text_projection(pooled2))


def _encoders(nets: P.Networks) -> list[Any]:
    return [e for e in (nets.text_encoder, nets.text_encoder_2) if e is not None]


def _check_room(model: P.DiffusionModel, ids: P.PromptIds, n: int) -> None:
    # the prefix pushes the prompt right by n: its end-of-text token must stay inside the 77
    for tok, arr in ((model.tokenizer, ids.ids), (model.tokenizer_2, ids.ids_2)):
        if arr is None:
            continue
        eos = tok.eos_token_id
        last = max(int(np.nonzero(row == eos)[0][0]) if (row == eos).any() else len(row) for row in np.asarray(arr))
        if last + n >= arr.shape[1]:
            raise ConfigError(f"attack: a prompt of {last + 1} tokens leaves no room for {n} prefix vectors "
                              f"in {arr.shape[1]} positions")


# ----------------------------------------------------------------------------- jitted pieces
def _unet_eps(unet: Any, x_t: jax.Array, t: jax.Array, emb: P.PromptEmbeds, time_ids: jax.Array | None) -> jax.Array:
    added = None if emb.text_embeds is None else {"text_embeds": emb.text_embeds, "time_ids": time_ids}
    return unet(x_t, t, emb.context, added_cond=added).sample.astype(jnp.float32)


@partial(runtime_jit, static_argnames=("schedule", "steps", "batch_size", "lr", "t_min", "t_max", "objective",
                                       "clip_skip", "size"))
def _optimize(nets: P.Networks, unet_base: Any, attack_ids: P.PromptIds, teacher_emb: P.PromptEmbeds,
              z0: jax.Array, prompt_index: jax.Array, u0: tuple[jax.Array, ...], scale: tuple[jax.Array, ...],
              key: jax.Array, *, schedule: S.NoiseSchedule, steps: int, batch_size: int, lr: float, t_min: int,
              t_max: int, objective: str, clip_skip: int | None, size: tuple[int, int]):
    """Adam on the prefix (``scale * u``) for ``steps`` updates in one scan: (u, losses [steps])."""
    tx = optax.adam(lr)
    n = z0.shape[0]
    sdxl = nets.text_encoder_2 is not None
    time_ids = P.sdxl_time_ids(batch_size, *size) if sdxl else None
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731

    def loss_fn(u, x_t, t, target, ids):
        prefix = tuple(s * v for s, v in zip(scale, u))
        emb = encode_with_prefix(nets, ids, prefix, clip_skip)
        return jnp.mean(jnp.square(_unet_eps(nets.unet, x_t, t, emb, time_ids) - target))

    def body(carry, k):
        u, opt = carry
        k_i, k_t, k_n = jax.random.split(k, 3)
        i = jax.random.randint(k_i, (batch_size,), 0, n)
        t = jax.random.randint(k_t, (batch_size,), t_min, t_max + 1, dtype=jnp.int32)
        z = z0[i]
        eps = jax.random.normal(k_n, z.shape, jnp.float32)
        x_t = S.add_noise(schedule, z, eps, t)
        p = prompt_index[i]
        if objective == "noise":
            target = eps
        else:  # the base model's denoising of the same noised latent under the plain target prompt
            target = jax.lax.stop_gradient(_unet_eps(unet_base, x_t, t, take(teacher_emb, p), time_ids))
        loss, grads = jax.value_and_grad(loss_fn)(u, x_t, t, target, take(attack_ids, p))
        updates, opt = tx.update(grads, opt, u)
        return (optax.apply_updates(u, updates), opt), loss

    (u, _), losses = jax.lax.scan(body, (u0, tx.init(u0)), jax.random.split(key, steps))
    return u, losses


@partial(runtime_jit, static_argnames=("schedule", "spec"))
def _generate(nets: P.Networks, ids: P.PromptIds, uncond_ids: P.PromptIds, prefix: tuple[jax.Array, ...] | None,
              keys: jax.Array, *, schedule: S.NoiseSchedule, spec: P.SamplingSpec) -> P.GenerateOutput:
    """``pipeline.generate_from_ids`` with a prefixed conditional prompt (the unconditional
    branch stays the plain empty prompt)."""
    cond = encode_with_prefix(nets, ids, prefix, spec.clip_skip)
    uncond = P.uncond_embeds(nets, uncond_ids, spec, cond) if spec.do_cfg else None
    noise = P.initial_latents(keys, P.latent_shape(nets, ids.ids.shape[0], spec.height, spec.width))
    latents = P.sample_latents(nets.unet, schedule, spec, cond, uncond, noise)
    return P.GenerateOutput(P.decode_latents(nets.vae, latents), latents)


_encode_jit = jax.jit(P.encode_prompt_ids, static_argnums=2)


@jax.jit
def _keys(seed: jax.Array, purpose: jax.Array, prompt_ids: jax.Array, image_idx: jax.Array) -> jax.Array:
    root = jax.random.fold_in(jax.random.key(seed), purpose)
    return jax.vmap(lambda p, j: jax.random.fold_in(jax.random.fold_in(root, p), j))(prompt_ids, image_idx)


def _images(model: P.DiffusionModel, nets: P.Networks, prompts: Sequence[str], n: int, purpose: int,
            cfg: AttackConfig, prefix: tuple[jax.Array, ...] | None = None,
            key_prompts: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float [P*n, H, W, 3], latents [P*n, h, w, C]) for each prompt x seeds 0..n-1;
    image (i, j)'s key comes from (seed, purpose, key_prompts[i] text, j)."""
    from jaxforget.eval.evaluate import prompt_seed

    spec = P.make_spec(model, sampler=cfg.sampler, num_inference_steps=cfg.num_inference_steps,
                       guidance_scale=cfg.guidance_scale,
                       zero_uncond=model.is_sdxl and model.force_zeros_for_empty_prompt)
    key_prompts = list(key_prompts or prompts)
    pi = np.repeat(np.arange(len(prompts)), n)
    ji = np.tile(np.arange(n, dtype=np.uint32), len(prompts))
    all_ids = P.tokenize_prompts(model, list(prompts))
    ids = P.PromptIds(all_ids.ids[pi], None if all_ids.ids_2 is None else all_ids.ids_2[pi])
    pids = np.array([prompt_seed(key_prompts[i]) for i in pi], np.uint32)
    keys = _keys(np.uint32(cfg.seed), np.uint32(purpose), pids, ji)
    out = _generate(nets, ids, P.tokenize_prompts(model, [""]), prefix, keys, schedule=model.schedule, spec=spec)
    images = np.asarray(jax.device_get(out.images), np.float32)
    return np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0), np.asarray(out.latents, np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _rate(judge: Any, images: np.ndarray, concept: str, domain: str) -> float:
    return float(np.mean(np.asarray(judge.detect(images, concept, domain), bool)))


# ----------------------------------------------------------------------------- the attack
def soft_prompt_attack(
    model: P.DiffusionModel,
    base_state: nnx.State,
    unlearned_state: nnx.State,
    target_prompt: str | Sequence[str],
    judge: Any,
    cfg: AttackConfig = AttackConfig(),
    *,
    concept: str,
    domain: str,
    attack_prompt: str | Sequence[str] | None = None,
) -> AttackResult:
    """Attack ``unlearned_state`` (a state of ``model.unet``'s graph) on one removed concept.

    ``target_prompt`` (one prompt or several; one prefix is shared by all): what the base model
    (``base_state``, the teacher) draws. ``attack_prompt`` (default: the target prompts, as in
    UnlearnDiffAtk): what the prefix is prepended to, one per target prompt; a sanity check can
    pass a prompt that does not name the concept. ``judge.detect(images, concept, domain)``
    decides success. Returns rates before / after the attack on the same (evaluation) seeds.
    """
    t0 = time.perf_counter()
    targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
    attacks = targets if attack_prompt is None else ([attack_prompt] if isinstance(attack_prompt, str)
                                                     else list(attack_prompt))
    if not targets or len(attacks) != len(targets):
        raise ValueError(f"need one attack prompt per target prompt ({len(attacks)} vs {len(targets)})")
    graphdef = nnx.split(model.unet)[0]
    unet_base = nnx.merge(graphdef, base_state)
    unet_unl = nnx.merge(graphdef, unlearned_state)
    teacher_nets = model.networks._replace(unet=unet_base)
    nets = model.networks._replace(unet=unet_unl)

    # 1. the teacher: the base model's images of the target prompts (latents are the attack's data)
    t_images, t_latents = _images(model, teacher_nets, targets, cfg.images, _TEACHER, cfg)
    teacher_rate = _rate(judge, t_images, concept, domain)

    # 2. the prefix, initialized at random vocabulary embeddings, in units of the table's std
    attack_ids = P.tokenize_prompts(model, attacks)
    _check_room(model, attack_ids, cfg.n_prefix)
    k_init = jax.random.fold_in(jax.random.key(cfg.seed), _INIT)
    tables = [e.text_model.embeddings.token_embedding.embedding[...] for e in _encoders(nets)]
    scale = tuple(jnp.std(tb).astype(jnp.float32) for tb in tables)
    u0 = tuple(tb[jax.random.randint(jax.random.fold_in(k_init, i), (cfg.n_prefix,), 0, tb.shape[0])]
               .astype(jnp.float32) / s for i, (tb, s) in enumerate(zip(tables, scale)))
    teacher_emb = _encode_jit(teacher_nets, P.tokenize_prompts(model, targets), model.clip_skip)
    t_max = min(cfg.t_max, model.schedule.num_train_timesteps - 1)
    u, losses = _optimize(
        nets, unet_base, attack_ids, teacher_emb, jnp.asarray(t_latents),
        jnp.asarray(np.repeat(np.arange(len(targets)), cfg.images), jnp.int32), u0, scale,
        jax.random.fold_in(jax.random.key(cfg.seed), _TRAIN), schedule=model.schedule, steps=cfg.steps,
        batch_size=cfg.batch_size, lr=float(cfg.lr), t_min=min(cfg.t_min, t_max), t_max=t_max,
        objective=cfg.objective, clip_skip=model.clip_skip, size=model.default_size)
    prefix = tuple(s * v for s, v in zip(scale, u))
    losses = np.asarray(losses, np.float64)

    # 3. judge the unlearned model on the attack prompts, same evaluation seeds with and without
    # the prefix (keys from the target prompt text, so "before" and "after" share them)
    before, _ = _images(model, nets, attacks, cfg.eval_images, _EVAL, cfg, key_prompts=targets)
    after, _ = _images(model, nets, attacks, cfg.eval_images, _EVAL, cfg, prefix=prefix, key_prompts=targets)
    n_show = slice(0, min(cfg.images, cfg.eval_images))
    return AttackResult(
        concept=concept, domain=domain, prompts=tuple(targets), attack_prompts=tuple(attacks),
        teacher_rate=teacher_rate, before=_rate(judge, before, concept, domain),
        after=_rate(judge, after, concept, domain),
        loss_start=float(losses[:10].mean()), loss_end=float(losses[-10:].mean()),
        seconds=time.perf_counter() - t0,
        images={"teacher": _to_uint8(t_images[:cfg.images][n_show]), "before": _to_uint8(before[n_show]),
                "after": _to_uint8(after[n_show])},
        prefix=tuple(np.asarray(p, np.float32) for p in prefix),
    )


# ----------------------------------------------------------------------------- many concepts, cached
def concept_prompts(catalogue: Any, concept: str, n: int) -> tuple[tuple[str, ...], str]:
    """(the first ``n`` evaluation prompts of ``concept``, its domain) from the catalogue; a
    concept the catalogue does not know is attacked with its own name as the prompt."""
    for c in getattr(catalogue, "concepts", ()):
        if c.name == concept:
            return tuple(c.eval_prompts[:n]), c.domain
    return (concept,), "any"


def _entry(cache_dir: Path, cache_key: str, cfg: AttackConfig, judge: Any, concept: str,
           prompts: Sequence[str]) -> Path:
    from jaxforget.eval.evaluate import _safe

    ident = json.dumps({"v": ATTACK_CACHE_VERSION, "key": cache_key, "cfg": cfg.digest(), "judge": judge.name,
                        "concept": concept, "prompts": list(prompts)}, sort_keys=True)
    return cache_dir / f"attack-{_safe(cache_key)}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def attack_concepts(
    model: P.DiffusionModel,
    base_state: nnx.State,
    unlearned_state: nnx.State,
    concepts: Sequence[tuple[str, str] | str],
    judge: Any,
    catalogue: Any,
    cfg: AttackConfig = AttackConfig(),
    *,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, AttackResult]:
    """``soft_prompt_attack`` on each removed concept (names or (name, domain) pairs) with its
    first ``cfg.prompts_per_concept`` evaluation prompts. With ``cache_dir`` and ``cache_key``
    (identifying ``unlearned_state``, e.g. its params hash) each concept's result (rates, image
    rows, prefix) is stored and reused."""
    from jaxforget.eval.evaluate import _read_entry, _write_entry

    out: dict[str, AttackResult] = {}
    for item in concepts:
        name = item if isinstance(item, str) else item[0]
        prompts, domain = concept_prompts(catalogue, name, cfg.prompts_per_concept)
        if not isinstance(item, str) and item[1] != "any":
            domain = item[1]
        entry = _entry(Path(cache_dir), cache_key, cfg, judge, name, prompts) if cache_dir and cache_key else None
        cached = _read_entry(entry) if entry is not None else None
        if cached is not None:
            s, arrays = cached
            res = AttackResult(
                concept=s["concept"], domain=s["domain"], prompts=tuple(s["prompts"]),
                attack_prompts=tuple(s["attack_prompts"]), teacher_rate=s["teacher_rate"], before=s["before"],
                after=s["after"], loss_start=s["loss_start"], loss_end=s["loss_end"], seconds=s["seconds"],
                images={k: arrays[f"images_{k}"] for k in ("teacher", "before", "after")},
                prefix=tuple(arrays[f"prefix_{i}"] for i in range(sum(1 for k in arrays if k.startswith("prefix_")))),
                from_cache=True)
        else:
            res = soft_prompt_attack(model, base_state, unlearned_state, prompts, judge, cfg, concept=name,
                                     domain=domain)
            if entry is not None:
                arrays = {f"images_{k}": v for k, v in res.images.items()}
                arrays.update({f"prefix_{i}": p for i, p in enumerate(res.prefix)})
                _write_entry(entry, res.summary(), arrays)
        if log is not None:
            log(f"attack on '{name}': judged as {name} {res.before:.0%} -> {res.after:.0%} of images "
                f"(base model {res.teacher_rate:.0%}; loss {res.loss_start:.4f} -> {res.loss_end:.4f}, "
                f"{res.seconds:.0f}s{', cached' if res.from_cache else ''})")
        out[name] = res
    return out


def attack_row(results: dict[str, AttackResult]) -> dict[str, float]:
    """Report columns: ``attack_success`` (mean success rate over the attacked concepts),
    ``attack_before`` (the same without the prefix) and ``attack_success/<concept>``."""
    if not results:
        return {}
    row = {"attack_success": float(np.mean([r.after for r in results.values()])),
           "attack_before": float(np.mean([r.before for r in results.values()]))}
    row.update({f"attack_success/{c}": r.after for c, r in results.items()})
    return row


def attack_grid(results: dict[str, AttackResult], path: str | Path, *, title: str | None = None) -> Path:
    """PNG: per attacked concept three rows, the base model's images, the unlearned model's
    without the prefix, and with it."""
    from jaxforget.eval.report import concept_grid

    rows: dict[str, np.ndarray] = {}
    for c, r in results.items():
        rows[f"{c}: base"] = r.images["teacher"]
        rows[f"{c}: before {r.before:.0%}"] = r.images["before"]
        rows[f"{c}: attacked {r.after:.0%}"] = r.images["after"]
    return concept_grid(rows, [], path, title=title)


__all__ = ["AttackConfig", "AttackResult", "soft_prompt_attack", "attack_concepts", "attack_row", "attack_grid",
           "encode_with_prefix", "concept_prompts"]
