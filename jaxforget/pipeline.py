"""Text-to-image sampling: prompt encoding and one jitted classifier-free-guided sampling loop.

Split in three so the engine can reuse each piece:
- Python, outside jit: ``tokenize`` / ``tokenize_prompts`` (transformers ``CLIPTokenizer``).
- Pure functions of arrays and modules (trace them under any ``jax.jit``, e.g. with the
  engine's shardings): ``encode_prompt_ids``, ``initial_latents``, ``sample_latents``,
  ``decode_latents``, ``generate_from_ids``.
- ``generate_jit`` (``generate_from_ids`` under one ``jax.jit`` with the runtime XLA options;
  schedule and spec static) and the convenience ``generate(model, prompts, key)``.

Semantics follow diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (so parity tests
can feed both the same initial latents): unconditional prompt "" (SDXL: zeros when the pipeline
sets ``force_zeros_for_empty_prompt``), one UNet call on concat(uncond, cond) per step,
``uncond + g * (cond - uncond)``, guidance off when g <= 1, DDIM or Euler steps, VAE decode to
[0, 1] NHWC. Latents are NHWC; the steps run in fp32 whatever the UNet's compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxforget import schedulers as S
from jaxforget.distributed import runtime_jit
from jaxforget.errors import ConfigError

SAMPLERS = ("ddim", "euler")


# ----------------------------------------------------------------------------- components
class Networks(NamedTuple):
    """The neural networks of a pipeline, as one pytree (NNX modules are pytrees): what the jitted
    functions take. Swap the UNet with ``nets._replace(unet=student)``."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any = None  # SDXL's CLIPTextModelWithProjection


@dataclass
class DiffusionModel:
    """A Stable Diffusion (1.x / 2.x) or SDXL pipeline's components. Plain constructor, no I/O:
    ``jaxforget.io.diffusers_folder`` builds the modules and tokenizers."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any  # transformers.CLIPTokenizer (Python; never inside jit)
    schedule: S.NoiseSchedule
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    # diffusers' SDXL pipeline config: the unconditional branch is all zeros (context and
    # pooled) when no negative prompt is given. Ignored for SD 1.x / 2.x.
    force_zeros_for_empty_prompt: bool = True
    clip_skip: int | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def networks(self) -> Networks:
        return Networks(self.unet, self.vae, self.text_encoder, self.text_encoder_2)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the UNet's sample_size times the VAE factor (diffusers)."""
        s = self.unet.config.sample_size
        if s is None:
            return 512, 512
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @classmethod
    def from_folder(cls, folder: Any, **overrides: Any) -> "DiffusionModel":
        """From a loaded ``jaxforget.io.diffusers_folder.ModelFolder`` (already in memory)."""
        kw: dict[str, Any] = dict(
            unet=folder.unet, vae=folder.vae, text_encoder=folder.text_encoder, tokenizer=folder.tokenizer,
            schedule=S.schedule_from_config(folder.scheduler_config),
            text_encoder_2=folder.text_encoder_2, tokenizer_2=folder.tokenizer_2,
            force_zeros_for_empty_prompt=bool(
                (getattr(folder, "model_index", None) or {}).get("force_zeros_for_empty_prompt", True)
            ),
        )
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True)
class SamplingSpec:
    """Static (compile-time) settings of a sampling run. Hashable: a jit static argument."""

    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    eta: float = 0.0  # DDIM only: 0 = deterministic
    return_latents: bool = False  # True: skip the VAE decode
    clip_skip: int | None = None
    zero_uncond: bool = False  # SDXL force_zeros_for_empty_prompt with no negative prompt

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: {self.sampler!r} is not supported (use one of {', '.join(SAMPLERS)})")
        if self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"image size must be positive, got {self.height}x{self.width}")

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


class PromptIds(NamedTuple):
    ids: jax.Array  # [B, L] int32 for text_encoder
    ids_2: jax.Array | None = None  # [B, L] for text_encoder_2 (SDXL)


class PromptEmbeds(NamedTuple):
    context: jax.Array  # [B, S, D]: the UNet's encoder_hidden_states
    text_embeds: jax.Array | None = None  # [B, P]: SDXL pooled, projected text embedding


class GenerateOutput(NamedTuple):
    images: jax.Array | None  # [B, H, W, 3] in [0, 1] (None with return_latents)
    latents: jax.Array  # [B, h, w, C] final (scaled) latents


# ----------------------------------------------------------------------------- tokenizing
def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """CLIP token ids [B, L] int32: padded to max_length (the tokenizer's, 77) and truncated."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    )
    return np.asarray(out["input_ids"], dtype=np.int32)


def tokenize_prompts(model: DiffusionModel, prompts: Sequence[str]) -> PromptIds:
    ids = tokenize(model.tokenizer, prompts)
    ids_2 = tokenize(model.tokenizer_2, prompts) if model.is_sdxl else None
    return PromptIds(ids, ids_2)


# ----------------------------------------------------------------------------- encoding
def encode_prompt_ids(
    nets: Networks, prompt_ids: PromptIds, clip_skip: int | None = None
) -> PromptEmbeds:
    """Token ids -> UNet conditioning, as diffusers' encode_prompt.

    SD: last_hidden_state (or, with clip_skip k, hidden_states[-(k+1)] through the final layer
    norm). SDXL: concat(enc1.hidden_states[-2], enc2.hidden_states[-2]) on features (clip_skip
    k: [-(k+2)], no final norm), pooled text_embeds from encoder 2.
    """
    ids = jnp.asarray(prompt_ids.ids, jnp.int32)
    if nets.text_encoder_2 is None:
        if clip_skip is None:
            return PromptEmbeds(nets.text_encoder(ids).last_hidden_state)
        out = nets.text_encoder(ids, output_hidden_states=True)
        return PromptEmbeds(nets.text_encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)]))
    if prompt_ids.ids_2 is None:
        raise ValueError("SDXL prompt encoding needs ids for both tokenizers (PromptIds.ids_2)")
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    out1 = nets.text_encoder(ids, output_hidden_states=True)
    out2 = nets.text_encoder_2(jnp.asarray(prompt_ids.ids_2, jnp.int32), output_hidden_states=True)
    h1, h2 = out1.hidden_states[layer], out2.hidden_states[layer]
    context = jnp.concatenate([h1, h2.astype(h1.dtype)], axis=-1)
    return PromptEmbeds(context, out2.text_embeds)


def sdxl_time_ids(
    batch: int,
    height: int,
    width: int,
    *,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
) -> jax.Array:
    """SDXL micro-conditioning [B, 6]: (orig h, w, crop top, left, target h, w), diffusers' defaults."""
    original_size = original_size or (height, width)
    target_size = target_size or (height, width)
    row = jnp.asarray([*original_size, *crops_coords_top_left, *target_size], jnp.float32)
    return jnp.broadcast_to(row, (batch, 6))


# ----------------------------------------------------------------------------- latents
def latent_shape(nets: Networks, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = 2 ** (len(nets.vae.config.block_out_channels) - 1)
    if height % f or width % f:
        raise ConfigError(f"image size {height}x{width} must be divisible by the VAE factor {f}")
    return batch, height // f, width // f, nets.unet.config.in_channels


def _is_batched_key(key: jax.Array) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2  # raw uint32 keys: [B, 2]


def initial_latents(
    key: jax.Array, shape: tuple[int, int, int, int], dtype=jnp.float32
) -> jax.Array:
    """Unit-variance N(0, 1) latents [B, h, w, C] (the sampler scales them by init_noise_sigma).

    A batch of keys ([B] typed or [B, 2] raw) gives each example its own stream, so an image
    depends only on its own key and prompt, never on the batch it was generated in.
    """
    if _is_batched_key(key):
        if key.shape[0] != shape[0]:
            raise ValueError(f"{key.shape[0]} keys for a batch of {shape[0]}")
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
    return jax.random.normal(key, shape, dtype)


def _fold_in(key: jax.Array, data: int | jax.Array) -> jax.Array:
    """fold_in for one key or a batch of keys (each folded independently)."""
    if _is_batched_key(key):
        return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)
    return jax.random.fold_in(key, data)


# ----------------------------------------------------------------------------- sampling
def _guided_model_output(
    unet: Any,
    latents_in: jax.Array,
    t: jax.Array,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    time_ids: jax.Array | None,
    guidance_scale: float,
) -> jax.Array:
    b = latents_in.shape[0]
    if uncond is None:  # guidance off: conditional branch only
        added = None if time_ids is None else {"text_embeds": cond.text_embeds, "time_ids": time_ids}
        out = unet(latents_in, jnp.broadcast_to(t, (b,)), cond.context, added_cond=added).sample
        return out.astype(jnp.float32)
    x = jnp.concatenate([latents_in, latents_in], axis=0)
    context = jnp.concatenate([uncond.context, cond.context], axis=0)
    added = None
    if time_ids is not None:
        added = {
            "text_embeds": jnp.concatenate([uncond.text_embeds, cond.text_embeds], axis=0),
            "time_ids": jnp.concatenate([time_ids, time_ids], axis=0),
        }
    out = unet(x, jnp.broadcast_to(t, (2 * b,)), context, added_cond=added).sample.astype(jnp.float32)
    out_uncond, out_cond = out[:b], out[b:]
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def _broadcast_embeds(e: PromptEmbeds, batch: int) -> PromptEmbeds:
    # an unconditional embedding computed once ([1, ...]) serves the whole batch
    if e.context.shape[0] == batch:
        return e
    return PromptEmbeds(
        jnp.broadcast_to(e.context, (batch,) + e.context.shape[1:]),
        None if e.text_embeds is None else jnp.broadcast_to(e.text_embeds, (batch,) + e.text_embeds.shape[1:]),
    )


def sample_latents(
    unet: Any,
    schedule: S.NoiseSchedule,
    spec: SamplingSpec,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    noise: jax.Array,
    key: jax.Array | None = None,
) -> jax.Array:
    """Run the sampler from unit-variance ``noise`` [B, h, w, C] to final latents (one lax.scan).

    ``uncond`` may have batch 1 (broadcast) and is unused when guidance is off. SDXL UNets get
    ``text_embeds`` from the embeddings and default time ids from ``spec``'s image size.
    ``key`` (one, or one per example) feeds DDIM's eta > 0 noise.
    """
    b = noise.shape[0]
    sdxl = cond.text_embeds is not None
    time_ids = sdxl_time_ids(b, spec.height, spec.width) if sdxl else None
    uncond = _broadcast_embeds(uncond, b) if (spec.do_cfg and uncond is not None) else None
    if spec.do_cfg and uncond is None:
        raise ValueError("guidance_scale > 1 needs unconditional embeddings")
    g = float(spec.guidance_scale)
    model = partial(_guided_model_output, unet, cond=cond, uncond=uncond, time_ids=time_ids, guidance_scale=g)
    x = noise.astype(jnp.float32)

    if spec.sampler == "ddim":
        ts = S.ddim_timesteps(schedule, spec.num_inference_steps)
        if spec.eta > 0 and key is None:
            raise ValueError("DDIM with eta > 0 needs a PRNG key")

        def ddim_body(carry, inp):
            i, t, t_prev = inp
            out = model(carry, t)
            # eta noise per step; per example when keys are per example
            step_noise = None if spec.eta == 0 else initial_latents(_fold_in(key, i), carry.shape)
            nxt, _ = S.ddim_step(schedule, out, t, t_prev, carry, eta=spec.eta, noise=step_noise)
            return nxt, None

        xs = (jnp.arange(len(ts.timesteps)), jnp.asarray(ts.timesteps), jnp.asarray(ts.prev_timesteps))
        x, _ = jax.lax.scan(ddim_body, x, xs)  # DDIM init_noise_sigma is 1
        return x

    es = S.euler_sigmas_and_timesteps(schedule, spec.num_inference_steps)

    def euler_body(carry, inp):
        t, sigma, sigma_next = inp
        out = model(S.euler_scale_model_input(carry, sigma), t)
        nxt, _ = S.euler_step(schedule, out, sigma, sigma_next, carry)
        return nxt, None

    x = x * es.init_noise_sigma
    xs = (jnp.asarray(es.timesteps), jnp.asarray(es.sigmas[:-1]), jnp.asarray(es.sigmas[1:]))
    x, _ = jax.lax.scan(euler_body, x, xs)
    return x


def decode_latents(vae: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents -> images [B, H, W, C] in [0, 1] (diffusers' decode + postprocess)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # SDXL-style per-channel latent statistics
        z = latents * jnp.asarray(std, latents.dtype) / cfg.scaling_factor + jnp.asarray(mean, latents.dtype)
    else:
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:
            z = z + cfg.shift_factor
    images = vae.decode(z).astype(jnp.float32)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def uncond_embeds(
    nets: Networks, uncond_ids: PromptIds | None, spec: SamplingSpec, like: PromptEmbeds
) -> PromptEmbeds:
    """The unconditional branch: encoded ``uncond_ids`` or, for SDXL's zero_uncond, zeros."""
    if spec.zero_uncond:
        return PromptEmbeds(
            jnp.zeros((1,) + like.context.shape[1:], like.context.dtype),
            None if like.text_embeds is None
            else jnp.zeros((1,) + like.text_embeds.shape[1:], like.text_embeds.dtype),
        )
    return encode_prompt_ids(nets, uncond_ids, spec.clip_skip)


def generate_from_ids(
    nets: Networks,
    prompt_ids: PromptIds,
    uncond_ids: PromptIds,
    key: jax.Array,
    *,
    schedule: S.NoiseSchedule,
    spec: SamplingSpec,
) -> GenerateOutput:
    """Pure: (networks, token ids, key) -> images and final latents.

    ``uncond_ids`` has batch 1 (the negative prompt, usually "") or B. ``key`` is one key or
    one per example (see ``initial_latents``); DDIM eta noise uses keys folded from it, so with
    per-example keys every example's result depends on its own key only.
    """
    b = prompt_ids.ids.shape[0]
    cond = encode_prompt_ids(nets, prompt_ids, spec.clip_skip)
    uncond = uncond_embeds(nets, uncond_ids, spec, cond) if spec.do_cfg else None
    noise = initial_latents(key, latent_shape(nets, b, spec.height, spec.width))
    step_key = _fold_in(key, 1) if (spec.sampler == "ddim" and spec.eta > 0) else None
    latents = sample_latents(nets.unet, schedule, spec, cond, uncond, noise, step_key)
    images = None if spec.return_latents else decode_latents(nets.vae, latents)
    return GenerateOutput(images, latents)


# the one compiled sampling program; recompiles only for new shapes, schedules or specs
# (``generate_jit.program()`` is the jit itself, e.g. to lower it)
generate_jit = runtime_jit(generate_from_ids, static_argnames=("schedule", "spec"))


def make_spec(model: DiffusionModel, **kw: Any) -> SamplingSpec:
    """A SamplingSpec with the model's defaults (image size, clip_skip) filled in."""
    h, w = model.default_size
    kw.setdefault("height", h)
    kw.setdefault("width", w)
    kw.setdefault("clip_skip", model.clip_skip)
    return SamplingSpec(**kw)


def generate(
    model: DiffusionModel,
    prompts: Sequence[str] | str,
    key: jax.Array,
    *,
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    eta: float = 0.0,
    return_latents: bool = False,
    nets: Networks | None = None,
) -> GenerateOutput:
    """Generate images for ``prompts`` (tokenized here, in Python; the rest is one jitted call).

    ``nets`` overrides the model's networks (e.g. an unlearned student UNet).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    # diffusers' SDXL: zero unconditional embeddings unless a negative prompt is given
    zero_uncond = model.is_sdxl and model.force_zeros_for_empty_prompt and negative_prompt is None
    kw: dict[str, Any] = dict(sampler=sampler, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, eta=eta, return_latents=return_latents,
                              zero_uncond=zero_uncond)
    if height is not None:
        kw["height"] = height
    if width is not None:
        kw["width"] = width
    spec = make_spec(model, **kw)
    prompt_ids = tokenize_prompts(model, prompts)
    uncond_ids = tokenize_prompts(model, [negative_prompt or ""])
    return generate_jit(nets or model.networks, prompt_ids, uncond_ids, key, schedule=model.schedule, spec=spec)


__all__ = [
    "Networks", "DiffusionModel", "SamplingSpec", "PromptIds", "PromptEmbeds", "GenerateOutput",
    "tokenize", "tokenize_prompts", "encode_prompt_ids", "sdxl_time_ids", "latent_shape", "initial_latents",
    "sample_latents", "decode_latents", "uncond_embeds", "generate_from_ids", "generate_jit", "make_spec",
    "generate",
]
