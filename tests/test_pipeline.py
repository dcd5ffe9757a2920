"""Whole sampling runs of jaxforget.pipeline against diffusers' StableDiffusionPipeline, and SDXL
prompt encoding against StableDiffusionXLPipeline.encode_prompt.

Both sides use the SAME tiny random components: torch models saved with save_pretrained into one
diffusers folder; the JAX side loads each component folder with load_module_weights and the key
tables. Diffusers gets the JAX-generated initial latents (transposed to NCHW).

Tolerances (fp32): final latents after 4 guided steps (guidance 7.5): max abs err <= 1e-4;
decoded images in [0, 1]: max abs err <= 1e-4; prompt embeddings: max abs err <= 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL as TorchVAE,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel as TorchUNet,
)
from flax import nnx

from jaxforget import pipeline as P
from jaxforget import schedulers as S
from jaxforget.io.clip_keys import CLIP_TEXT_KEYS
from jaxforget.io.unet_keys import UNET_KEYS
from jaxforget.io.vae_keys import VAE_KEYS
from jaxforget.io.weights import load_module_weights
from jaxforget.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig
from jaxforget.models.vae import AutoencoderKL, VAEConfig

from jaxforget.tokenizers import build_clip_tokenizer, load_clip_tokenizer

LATENT_TOL = 1e-4
IMAGE_TOL = 1e-4
EMBED_TOL = 1e-5
STEPS = 4
GUIDANCE = 7.5
SIZE = 16  # pixels; VAE factor 2 -> 8x8 latents

TEXTS = ["a photo of a cat", "a painting of a dog in the style of van gogh", "an astronaut riding a horse",
         "a red car on a street", "a bowl of fruit"]
PROMPTS = ["a photo of a cat", "a painting of a red dog"]
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
             timestep_spacing="leading")
UNET_BASE = dict(in_channels=4, out_channels=4, sample_size=SIZE // 2, block_out_channels=(32, 64),
                 layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4))
SD_UNET = dict(UNET_BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE_CFG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
               norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE)


def maxerr(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def perturb(model, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off-identity norms, non-zero biases: nothing trivially cancels
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def clip_config(tok, **kw) -> transformers.CLIPTextConfig:
    d = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d.update(kw)
    return transformers.CLIPTextConfig(**d)


def load_jax_clip(folder: Path, cls):
    cfg = CLIPTextConfig.from_transformers(json.loads((folder / "config.json").read_text()))
    return load_module_weights(lambda: cls(cfg, rngs=nnx.Rngs(0)), folder, CLIP_TEXT_KEYS)


def load_jax_unet(folder: Path):
    cfg = UNetConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    return load_module_weights(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), folder, UNET_KEYS)


def load_jax_vae(folder: Path):
    cfg = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    return load_module_weights(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)), folder, VAE_KEYS)


# ----------------------------------------------------------------------------- SD fixture
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tok_dir = build_clip_tokenizer(TEXTS, root / "_tok")
    tok = load_clip_tokenizer(tok_dir)
    torch.manual_seed(0)
    text_encoder = perturb(transformers.CLIPTextModel(clip_config(tok)), 1, 0.05)
    unet = perturb(TorchUNet(**SD_UNET), 2, 0.02)
    vae = perturb(TorchVAE(**VAE_CFG), 3, 0.02)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**SCHED),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = root / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    model = P.DiffusionModel(
        unet=load_jax_unet(folder / "unet"),
        vae=load_jax_vae(folder / "vae"),
        text_encoder=load_jax_clip(folder / "text_encoder", CLIPTextModel),
        tokenizer=tok,
        schedule=S.schedule_from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text())),
    )
    model.folder = folder  # for the from_folder test
    return pipe, model


def run_diffusers(pipe, prompts, latents_nhwc, steps, guidance, height, width):
    captured = {}

    def grab(p, i, t, kw):
        captured["latents"] = kw["latents"].detach().clone()
        return kw

    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                      latents=torch.from_numpy(np.asarray(latents_nhwc).transpose(0, 3, 1, 2).copy()),
                      output_type="np", callback_on_step_end=grab).images
    return captured["latents"].numpy().transpose(0, 2, 3, 1), images


@pytest.mark.parametrize("sampler,prediction_type,spacing", [("ddim", "epsilon", "leading"),
                                                              ("euler", "v_prediction", "linspace")])
def test_sd_sampling_matches_diffusers(sd, sampler, prediction_type, spacing):
    pipe, model = sd
    cfg = dict(SCHED, prediction_type=prediction_type, timestep_spacing=spacing)
    cls = DDIMScheduler if sampler == "ddim" else EulerDiscreteScheduler
    pipe.scheduler = cls.from_config(cfg)
    model.schedule = S.schedule_from_config(cfg)
    keys = jax.random.split(jax.random.key(7), len(PROMPTS))  # one noise stream per example
    out = P.generate(model, PROMPTS, keys, sampler=sampler, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    noise = P.initial_latents(keys, P.latent_shape(model.networks, len(PROMPTS), SIZE, SIZE))
    want_latents, want_images = run_diffusers(pipe, PROMPTS, noise, STEPS, GUIDANCE, SIZE, SIZE)
    assert out.latents.shape == (2, SIZE // 2, SIZE // 2, 4) and out.images.shape == (2, SIZE, SIZE, 3)
    lat_err, img_err = maxerr(out.latents, want_latents), maxerr(out.images, want_images)
    print(f"{sampler}/{prediction_type}: latents max abs err {lat_err:.2e} (|max| {np.abs(want_latents).max():.2f}),"
          f" images {img_err:.2e}")
    # the comparison means something: guidance moved the result and the images are not saturated
    assert np.abs(want_latents - np.asarray(noise)).max() > 0.1
    assert 0.05 < float(np.std(want_images)) and 0.0 < want_images.mean() < 1.0
    assert lat_err <= LATENT_TOL
    assert img_err <= IMAGE_TOL


def test_sd_encode_prompt_matches_diffusers(sd):
    pipe, model = sd
    ids = P.tokenize_prompts(model, PROMPTS + [""])
    assert ids.ids.shape == (3, 77) and ids.ids.dtype == np.int32
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS + [""], "cpu", 1, False)
        # clip_skip=1 by hand: diffusers 0.42 reaches for text_encoder.text_model, which
        # transformers 5 no longer has; the rule is hidden_states[-(k+1)] -> final_layer_norm
        te = pipe.text_encoder
        hs = te(torch.from_numpy(ids.ids).long(), output_hidden_states=True).hidden_states
        want_skip = te.final_layer_norm(hs[-2])
    got = P.encode_prompt_ids(model.networks, ids)
    assert got.text_embeds is None
    assert maxerr(got.context, want.numpy()) <= EMBED_TOL
    assert maxerr(P.encode_prompt_ids(model.networks, ids, clip_skip=1).context, want_skip.numpy()) <= EMBED_TOL
    assert maxerr(got.context, want_skip.numpy()) > 1e-2  # clip_skip changes the result


def test_generate_is_deterministic_and_per_example(sd):
    """Same keys -> same output; with one key per example, an example's result depends only on
    its own prompt and key, not on its batch neighbours or position (replay generation relies on
    it). Uses the DDIM program compiled above (equal schedule and spec: no recompile)."""
    pipe, model = sd
    model.schedule = S.schedule_from_config(SCHED)
    spec = P.make_spec(model, sampler="ddim", num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    nets = model.networks
    ids = P.tokenize_prompts(model, PROMPTS)
    uncond = P.tokenize_prompts(model, [""])
    k0, k1, k2 = jax.random.split(jax.random.key(3), 3)
    both = P.generate_jit(nets, ids, uncond, jnp.stack([k0, k1]), schedule=model.schedule, spec=spec)
    again = P.generate_jit(nets, ids, uncond, jnp.stack([k0, k1]), schedule=S.schedule_from_config(SCHED), spec=spec)
    np.testing.assert_array_equal(np.asarray(both.latents), np.asarray(again.latents))
    np.testing.assert_array_equal(np.asarray(both.images), np.asarray(again.images))
    swapped = P.generate_jit(nets, P.PromptIds(ids.ids[::-1].copy()), uncond, jnp.stack([k1, k2]),
                             schedule=model.schedule, spec=spec)
    assert maxerr(swapped.latents[0], both.latents[1]) <= 1e-5
    assert maxerr(swapped.latents[1], both.latents[0]) > 1e-2  # other prompt and key
    assert maxerr(both.latents[0], both.latents[1]) > 1e-2
    # guidance off (g <= 1: conditional branch only, as diffusers) changes the result
    nocfg = P.generate_jit(nets, ids, uncond, jnp.stack([k0, k1]), schedule=model.schedule,
                           spec=P.make_spec(model, sampler="ddim", num_inference_steps=1, guidance_scale=1.0,
                                            return_latents=True))
    assert nocfg.images is None and nocfg.latents.shape == both.latents.shape
    pipe.scheduler = DDIMScheduler.from_config(SCHED)
    noise = P.initial_latents(jnp.stack([k0, k1]), nocfg.latents.shape)
    want, _ = run_diffusers(pipe, PROMPTS, noise, 1, 1.0, SIZE, SIZE)
    assert maxerr(nocfg.latents, want) <= LATENT_TOL


def test_ddim_eta_noise_is_keyed(sd):
    """DDIM with eta > 0 adds fresh noise inside the scan, drawn from the call's key."""
    _, model = sd
    model.schedule = S.schedule_from_config(SCHED)
    ids, uncond = P.tokenize_prompts(model, PROMPTS), P.tokenize_prompts(model, [""])
    keys = jax.random.split(jax.random.key(5), 2)

    def run(eta, k):
        spec = P.make_spec(model, sampler="ddim", num_inference_steps=1, guidance_scale=1.0, eta=eta,
                           return_latents=True)
        return np.asarray(P.generate_jit(model.networks, ids, uncond, k, schedule=model.schedule, spec=spec).latents)

    a, b = run(0.5, keys), run(0.5, keys)
    np.testing.assert_array_equal(a, b)
    assert maxerr(a, run(0.0, keys)) > 1e-3
    other = jax.random.split(jax.random.key(5), 2).at[1].set(jax.random.key(9))
    c = run(0.5, other)
    # per-example keys: the eta noise of example 0 does not depend on example 1's key
    np.testing.assert_array_equal(c[0], a[0])
    assert maxerr(c[1], a[1]) > 1e-3


def test_from_folder_matches_component_loading(sd):
    """DiffusionModel.from_folder on jaxforget.io's loaded folder gives the same model."""
    from jaxforget.io.diffusers_folder import load_model_folder

    _, model = sd
    loaded = P.DiffusionModel.from_folder(load_model_folder(model.folder))
    assert not loaded.is_sdxl and loaded.default_size == (SIZE, SIZE) and loaded.vae_scale_factor == 2
    assert loaded.schedule == S.schedule_from_config(SCHED)
    ids = P.tokenize_prompts(loaded, PROMPTS)
    np.testing.assert_array_equal(ids.ids, P.tokenize_prompts(model, PROMPTS).ids)
    a = P.encode_prompt_ids(loaded.networks, ids).context
    b = P.encode_prompt_ids(model.networks, ids).context
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_spec_validation():
    from jaxforget.errors import ConfigError

    with pytest.raises(ConfigError):
        P.SamplingSpec(sampler="dpm")
    with pytest.raises(ConfigError):
        P.SamplingSpec(num_inference_steps=0)


# ----------------------------------------------------------------------------- SDXL
SDXL_UNET = dict(UNET_BASE, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + 48,
                 transformer_layers_per_block=[1, 2], use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    tok_dir = build_clip_tokenizer(TEXTS, root / "_tok")
    tok, tok2 = load_clip_tokenizer(tok_dir), load_clip_tokenizer(tok_dir)
    torch.manual_seed(0)
    te1 = perturb(transformers.CLIPTextModel(clip_config(tok)), 4, 0.05)
    te2 = perturb(transformers.CLIPTextModelWithProjection(
        clip_config(tok2, hidden_size=48, intermediate_size=40, projection_dim=16, hidden_act="gelu")), 5, 0.05)
    unet = perturb(TorchUNet(**SDXL_UNET), 6, 0.02)
    vae = perturb(TorchVAE(**VAE_CFG), 7, 0.02)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=DDIMScheduler(**SCHED), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    folder = root / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    model = P.DiffusionModel(
        unet=load_jax_unet(folder / "unet"),
        vae=load_jax_vae(folder / "vae"),
        text_encoder=load_jax_clip(folder / "text_encoder", CLIPTextModel),
        tokenizer=tok,
        schedule=S.schedule_from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text())),
        text_encoder_2=load_jax_clip(folder / "text_encoder_2", CLIPTextModelWithProjection),
        tokenizer_2=tok2,
        force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"],
    )
    return pipe, model


def test_sdxl_sampling_matches_diffusers(sdxl):
    """Two encoders, pooled text_embeds + time_ids micro-conditioning, zero unconditional branch."""
    pipe, model = sdxl
    assert model.is_sdxl and model.force_zeros_for_empty_prompt
    key = jax.random.key(11)
    out = P.generate(model, PROMPTS, key, sampler="ddim", num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    noise = P.initial_latents(key, P.latent_shape(model.networks, len(PROMPTS), SIZE, SIZE))
    want_latents, want_images = run_diffusers(pipe, PROMPTS, noise, STEPS, GUIDANCE, SIZE, SIZE)
    lat_err, img_err = maxerr(out.latents, want_latents), maxerr(out.images, want_images)
    print(f"sdxl ddim: latents max abs err {lat_err:.2e} (|max| {np.abs(want_latents).max():.2f}),"
          f" images {img_err:.2e}")
    assert np.abs(want_latents - np.asarray(noise)).max() > 0.1
    assert lat_err <= LATENT_TOL
    assert img_err <= IMAGE_TOL


def test_sdxl_encode_prompt_matches_diffusers(sdxl):
    pipe, model = sdxl
    nets, tok, tok2 = model.networks, model.tokenizer, model.tokenizer_2
    ids = P.PromptIds(P.tokenize(tok, PROMPTS), P.tokenize(tok2, PROMPTS))
    got = P.encode_prompt_ids(nets, ids)
    assert got.context.shape == (2, 77, 32 + 48) and got.text_embeds.shape == (2, 16)
    with torch.no_grad():
        want, want_neg, want_pooled, want_neg_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="")
    assert maxerr(got.context, want.numpy()) <= EMBED_TOL
    assert maxerr(got.text_embeds, want_pooled.numpy()) <= EMBED_TOL
    neg = P.encode_prompt_ids(nets, P.PromptIds(P.tokenize(tok, [""]), P.tokenize(tok2, [""])))
    assert maxerr(np.broadcast_to(neg.context, want_neg.shape), want_neg.numpy()) <= EMBED_TOL
    assert maxerr(np.broadcast_to(neg.text_embeds, want_neg_pooled.shape), want_neg_pooled.numpy()) <= EMBED_TOL
    # force_zeros_for_empty_prompt: no negative prompt -> zero unconditional embeddings
    with torch.no_grad():
        _, zneg, _, zpooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=True)
    z = P.uncond_embeds(nets, None, P.SamplingSpec(zero_uncond=True), got)
    assert float(zneg.abs().max()) == 0 and float(zpooled.abs().max()) == 0
    assert z.context.shape == (1, 77, 80) and float(jnp.abs(z.context).max()) == 0
    assert z.text_embeds.shape == (1, 16) and float(jnp.abs(z.text_embeds).max()) == 0
    # SDXL micro-conditioning, as diffusers' _get_add_time_ids with default sizes and crops
    np.testing.assert_array_equal(np.asarray(P.sdxl_time_ids(2, 64, 48)), [[64, 48, 0, 0, 64, 48]] * 2)
