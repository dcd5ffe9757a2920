"""Tiny random diffusers pipeline folders on disk, for tests (no hub access).

``build_sd_folder(path, kind, seed)`` writes a complete diffusers folder with ``save_pretrained
(..., safe_serialization=True)``, laid out like the real checkpoints on the hub:

- ``"sd1"``: CLIPTextModel (quick_gelu, legacy eos_token_id 2) + UNet with 1x1-conv proj_in/out
  + AutoencoderKL (2 blocks) + DDIMScheduler (epsilon) + CLIPTokenizer padding with <|endoftext|>.
- ``"sd2"``: CLIPTextModel (gelu) + UNet with linear proj_in/out, upcast attention + VAE +
  DDIMScheduler with v-prediction + CLIPTokenizer padding with "!".
- ``"sdxl"``: CLIPTextModel + CLIPTextModelWithProjection (gelu, hidden 48, projection 16) + UNet
  with ``text_time`` added embedding (context 32 + 48 = 80, transformer depth 2 in the last level)
  + VAE (scaling 0.13025) + EulerDiscreteScheduler; tokenizer pads with <|endoftext|>,
  tokenizer_2 with "!" (as SDXL base).

Sizes: UNet block_out_channels (32, 64), sample_size 8 (8x8 latents); VAE (8, 16) channels,
16x16 images; CLIP hidden 32, 2 layers, 4 heads. Every parameter is perturbed (norm scales off 1,
biases off 0), so parity tests cannot pass by accident.

Real-layout details that ``save_pretrained`` under transformers 5 does not reproduce, fixed here:
text encoder keys carry the ``text_model.`` prefix (re-saved with safetensors.torch.save_file),
and tokenizer folders hold vocab.json + merges.txt (+ tokenizer_config.json,
special_tokens_map.json) instead of transformers 5's tokenizer.json.

``load_torch_pipeline(path)`` reads a folder back with diffusers (the PyTorch reference).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file

try:  # the package's tokenizer builder; the test-local one while it is absent
    from jaxforget.tokenizers import build_clip_tokenizer
except ImportError:  # pragma: no cover - depends on the other module's presence
    build_clip_tokenizer = None

KINDS = ("sd1", "sd2", "sdxl")
TOKENIZER_TEXTS = (
    "a photo of a cat", "a painting of a dog in the style of van gogh", "an astronaut riding a horse",
    "a red car on a street", "a bowl of fruit on a wooden table", "a portrait of a woman, oil on canvas",
)
IMAGE_SIZE = 16  # pixels; the VAE downsamples by 2 -> 8x8 latents
LATENT_SIZE = 8
CLIP_HIDDEN = 32
CLIP2_HIDDEN = 48  # SDXL's second encoder (distinct, so a wrong concat order changes shapes)
POOLED_DIM = 16  # SDXL text_encoder_2 projection_dim
ADD_TIME_DIM = 8  # SDXL addition_time_embed_dim

_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              steps_offset=1, timestep_spacing="leading")
_DDIM = dict(_SCHED, clip_sample=False, set_alpha_to_one=False)
_UNET = dict(in_channels=4, out_channels=4, sample_size=LATENT_SIZE, block_out_channels=(32, 64),
             layers_per_block=1, norm_num_groups=8)
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(_UNET, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CLIP_HIDDEN,
                attention_head_dim=(2, 4)),
    "sd2": dict(_UNET, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CLIP_HIDDEN,
                attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=CLIP_HIDDEN + CLIP2_HIDDEN,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
                 projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + POOLED_DIM),
}
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=IMAGE_SIZE,
)
# (weight perturbation scale per component): enough to move every norm / bias off its init
_PERTURB = {"text_encoder": 0.05, "unet": 0.05, "vae": 0.05}


def perturb(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Add scale * N(0, 1) noise to every parameter (norms, biases, embeddings included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _clip_config(tok, *, hidden: int, legacy_eos: bool, **kw) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tok.model_max_length, bos_token_id=0 if legacy_eos else tok.bos_token_id,
        # the real SD 1.x / 2.x configs say eos_token_id 2 (pool at the argmax id)
        eos_token_id=2 if legacy_eos else tok.eos_token_id, pad_token_id=1, **kw)


def _build_tokenizer(out_dir: Path, pad_token: str) -> Path:
    """CLIPTokenizer files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    if build_clip_tokenizer is not None:
        return build_clip_tokenizer(TOKENIZER_TEXTS, out_dir, pad_token=pad_token)
    from _tokenizer_fixture import build_tiny_clip_tokenizer  # fallback: vocab.json + merges.txt only

    out = build_tiny_clip_tokenizer(TOKENIZER_TEXTS, out_dir)
    eos = "<|endoftext|>"
    specials = {"bos_token": "<|startoftext|>", "eos_token": eos, "unk_token": eos, "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "special_tokens_map.json").write_text(json.dumps(specials))
    return out


def _resave_with_text_model_prefix(model: torch.nn.Module, folder: Path) -> None:
    """transformers 5 saves CLIPTextModel keys without ``text_model.``; real SD folders have it."""
    sd = {}
    for key, value in model.state_dict().items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        sd[key] = value.detach().contiguous().clone()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _real_tokenizer_layout(src: Path, dst: Path) -> None:
    """Replace transformers 5's tokenizer.json folder by the hub layout (vocab.json + merges.txt)."""
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


def build_sd_folder(path: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random diffusers pipeline folder of the given kind ("sd1", "sd2", "sdxl") at
    ``path`` (created, with parents; must not exist yet) and return it. Deterministic in ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(path)
    with tempfile.TemporaryDirectory() as tmp:
        # SD 2.x tokenizers and SDXL's tokenizer_2 pad with "!", SD 1.x's with <|endoftext|>
        tok_src = _build_tokenizer(Path(tmp) / "tokenizer", "!" if kind == "sd2" else "<|endoftext|>")
        tok2_src = _build_tokenizer(Path(tmp) / "tokenizer_2", "!") if kind == "sdxl" else None
        _write_pipeline(path, kind, seed, tok_src, tok2_src)
    return path


def _write_pipeline(path: Path, kind: str, seed: int, tok_src: Path, tok2_src: Path | None) -> None:
    tok = transformers.CLIPTokenizer.from_pretrained(str(tok_src))
    torch.manual_seed(seed)
    if kind == "sdxl":
        tok2 = transformers.CLIPTokenizer.from_pretrained(str(tok2_src))
        te = perturb(transformers.CLIPTextModel(_clip_config(tok, hidden=CLIP_HIDDEN, legacy_eos=True)),
                     seed + 1, _PERTURB["text_encoder"])
        te2 = perturb(transformers.CLIPTextModelWithProjection(_clip_config(
            tok2, hidden=CLIP2_HIDDEN, legacy_eos=False, hidden_act="gelu", projection_dim=POOLED_DIM)),
            seed + 2, _PERTURB["text_encoder"])
    else:
        act = "quick_gelu" if kind == "sd1" else "gelu"
        te = perturb(transformers.CLIPTextModel(_clip_config(tok, hidden=CLIP_HIDDEN, legacy_eos=kind == "sd1",
                                                             hidden_act=act)),
                     seed + 1, _PERTURB["text_encoder"])
        tok2 = te2 = None
    unet = perturb(UNet2DConditionModel(**UNET_CONFIGS[kind]), seed + 3, _PERTURB["unet"])
    vae_cfg = dict(VAE_CONFIG, scaling_factor=0.13025) if kind == "sdxl" else VAE_CONFIG
    vae = perturb(AutoencoderKL(**vae_cfg), seed + 4, _PERTURB["vae"])
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
            scheduler=EulerDiscreteScheduler(**_SCHED, prediction_type="epsilon"),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pred = "v_prediction" if kind == "sd2" else "epsilon"
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**_DDIM, prediction_type=pred),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    _resave_with_text_model_prefix(te, path / "text_encoder")
    _real_tokenizer_layout(tok_src, path / "tokenizer")
    if te2 is not None:
        _resave_with_text_model_prefix(te2, path / "text_encoder_2")
        _real_tokenizer_layout(tok2_src, path / "tokenizer_2")


def load_torch_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    """The folder read back by diffusers (StableDiffusionPipeline or StableDiffusionXLPipeline)."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    cls = StableDiffusionXLPipeline if index["_class_name"] == "StableDiffusionXLPipeline" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# a tiny random CLIPModel (both towers), for the CLIP judge
CLIP_TEXT_CFG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
                     pad_token_id=1)
CLIP_IMAGE_SIZE, CLIP_PATCH, CLIP_PROJ = 32, 8, 20
CLIP_VISION_CFG = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                       image_size=CLIP_IMAGE_SIZE, patch_size=CLIP_PATCH, hidden_act="gelu")


def build_clip_folder(folder: str | Path, texts: tuple[str, ...] = TOKENIZER_TEXTS, seed: int = 0):
    """A tiny random CLIPModel folder in the hub layout (model.safetensors with both towers'
    position_ids buffers, tokenizer files, preprocessor_config.json) at ``folder``; returns
    (the torch CLIPModel, folder, its CLIPTokenizer). ``texts`` make the tokenizer's vocabulary."""
    folder = Path(folder)
    build_clip_tokenizer(texts, folder)
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=dict(CLIP_TEXT_CFG, vocab_size=len(tok)), vision_config=CLIP_VISION_CFG,
                                  projection_dim=CLIP_PROJ)
    model = perturb(transformers.CLIPModel(cfg), seed=seed, scale=0.1)
    model.save_pretrained(folder, safe_serialization=True)
    # hub CLIP files (openai/clip-vit-*) still carry both towers' position_ids buffers
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors["vision_model.embeddings.position_ids"] = torch.arange((CLIP_IMAGE_SIZE // CLIP_PATCH) ** 2 + 1)[None]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    transformers.CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                    crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
                                    ).save_pretrained(folder)
    return model, folder, tok
