"""CLIP vision tower + full CLIPModel + CLIPJudge: parity with transformers on a tiny random model.

Tolerances:
- model parity (fp32): max relative error max|a-b| / max|b| <= 1e-4 for image features, text
  features, logits_per_image, vision hidden states;
- preprocessing vs transformers' CLIPImageProcessor (its PIL backend: no torchvision here): at
  most 1.5 grey levels (1.5/255 in [0, 1] pixel units) per pixel and 0.5/255 on average, on
  uniform-noise images (the worst case for cubic overshoot); PIL rounds to uint8 after each
  resize pass, we do not.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from jaxforget.errors import CheckpointFormatError, ConfigError
from jaxforget.eval.clip_judge import CLIPJudge, labels_by_domain
from jaxforget.io.clip_model import CLIP_MODEL_KEYS, load_clip_model, load_clip_vision_model
from jaxforget.io.weights import module_to_tensors
from jaxforget.models.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPConfig,
    ImagePreprocess,
    preprocess_images,
    resize_output_size,
)
from jaxforget.tokenizers import encode_prompts
from tiny_pipelines import CLIP_IMAGE_SIZE, CLIP_PROJ, CLIP_VISION_CFG, build_clip_folder

TOL = 1e-4
TEXTS = ("a photo of a cat", "a painting of a dog in the style of van gogh", "an astronaut riding a horse",
         "a red car on a street", "a portrait of a woman, oil on canvas", "a sketch of a bird")
LABELS = {"object": ["cat", "dog", "horse", "car", "bird"], "style": ["van gogh", "oil on canvas", "sketch"]}
IMAGE_SIZE, PROJ, VISION_CFG = CLIP_IMAGE_SIZE, CLIP_PROJ, CLIP_VISION_CFG


# jitted: one compile per input shape instead of one per primitive in eager mode (faster tests)
preprocess_jit = jax.jit(preprocess_images, static_argnums=1, static_argnames="value_range")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter (LN scales, zero biases, class token, logit_scale) moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def noise_images(seed: int, n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def to_torch_pixels(pixels) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(pixels).transpose(0, 3, 1, 2)))


def pooled(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """(torch CLIPModel, folder in the real hub layout, tokenizer)."""
    return build_clip_folder(tmp_path_factory.mktemp("clip"), TEXTS)


@pytest.fixture(scope="module")
def bundle(clip_folder):
    return load_clip_model(clip_folder[1])


def _pixels(bundle, images):
    return preprocess_jit(jnp.asarray(images), bundle.preprocess)


def test_model_parity(clip_folder, bundle):
    model, _, tok = clip_folder
    assert bundle.config.projection_dim == PROJ and bundle.config.vision_config.image_size == IMAGE_SIZE
    assert bundle.preprocess == ImagePreprocess.for_image_size(IMAGE_SIZE)
    assert abs(float(bundle.model.logit_scale[...]) - float(model.logit_scale.detach())) == 0.0  # loaded, not init
    pixels = _pixels(bundle, noise_images(1, 3, 40, 52))
    ids = encode_prompts(bundle.tokenizer, ["a photo of a cat", "a dog", "a red car on a street, oil on canvas"],
                         bundle.max_length)
    assert bundle.max_length == 77
    with torch.no_grad():
        tp, ti = to_torch_pixels(pixels), torch.as_tensor(ids, dtype=torch.long)
        ref_img = pooled(model.get_image_features(pixel_values=tp))
        ref_txt = pooled(model.get_text_features(input_ids=ti))
        ref = model(input_ids=ti, pixel_values=tp)
        ref_hidden = model.vision_model(pixel_values=tp, output_hidden_states=True).hidden_states
    @nnx.jit
    def forward(m, ids, pixels):
        hidden = m.vision_model(pixels, output_hidden_states=True).hidden_states
        return m(ids, pixels), m.get_image_features(pixels), m.get_text_features(ids), hidden

    out, img, txt, ours_hidden = forward(bundle.model, jnp.asarray(ids), pixels)
    errs = {
        "image_features": rel_err(img, ref_img),
        "text_features": rel_err(txt, ref_txt),
        "logits_per_image": rel_err(out.logits_per_image, ref.logits_per_image),
        "logits_per_text": rel_err(out.logits_per_text, ref.logits_per_text),
        "image_embeds": rel_err(out.image_embeds, ref.image_embeds),
    }
    assert len(ours_hidden) == len(ref_hidden) == VISION_CFG["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours_hidden, ref_hidden)):
        errs[f"vision_hidden[{i}]"] = rel_err(a, b)
    print({k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    # the logits discriminate: rows are not all the same
    assert np.ptp(np.asarray(out.logits_per_image)) > 1e-3


def test_preprocess_matches_clip_image_processor(bundle):
    processor = transformers.CLIPImageProcessor.from_pretrained(str(bundle.path))
    std = np.asarray(CLIP_STD, np.float32)
    for i, (h, w) in enumerate([(40, 56), (20, 28), (64, 40), (33, 100), (200, 150), (31, 31), (32, 32)]):
        images = noise_images(10 + i, 2, h, w)
        ref = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = np.asarray(preprocess_jit(jnp.asarray(images), bundle.preprocess))
        assert ours.shape == ref.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
        diff = np.abs(ours - ref) * std  # back to [0, 1] pixel units
        print((h, w), f"max {diff.max() * 255:.2f} mean {diff.mean() * 255:.2f} grey levels")
        assert diff.max() <= 1.5 / 255 and diff.mean() <= 0.5 / 255, (h, w)
    # floats in [0, 1] and in [-1, 1] are the same image as the uint8 one
    images = noise_images(3, 2, 40, 40)
    a = preprocess_images(jnp.asarray(images), bundle.preprocess)
    b = preprocess_images(jnp.asarray(images / 255.0, jnp.float32), bundle.preprocess)
    c = preprocess_images(jnp.asarray(images / 127.5 - 1.0, jnp.float32), bundle.preprocess, value_range=(-1.0, 1.0))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_preprocess_sizes_and_config_forms():
    assert resize_output_size(40, 56, 32) == (32, 44)  # transformers floors the long edge
    assert resize_output_size(100, 33, 32) == (96, 32)
    assert resize_output_size(40, 56, (24, 30)) == (24, 30)
    old = ImagePreprocess.from_transformers({"size": 224, "crop_size": 224, "resample": 3}, 224)
    new = ImagePreprocess.from_transformers(
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
         "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}, 224)
    assert old == new == ImagePreprocess.for_image_size(224)
    # a crop larger than the image zero-pads (ceil half before), as transformers does
    prep = ImagePreprocess(size=4, crop_size=(7, 7), do_resize=False, do_normalize=False)
    out = np.asarray(preprocess_images(jnp.ones((1, 4, 4, 3), jnp.uint8) * 255, prep))
    assert out.shape == (1, 7, 7, 3)
    np.testing.assert_array_equal(out[0, :, :, 0].sum(0), [0, 0, 4, 4, 4, 4, 0])
    with pytest.raises(ConfigError, match="unsupported resample"):
        ImagePreprocess.from_transformers({"resample": 9}, 224)


def test_judge_detect_alignment_features(clip_folder, bundle):
    model, _, _ = clip_folder
    images = noise_images(5, 6, 48, 40)
    pixels = _pixels(bundle, images)
    judge = CLIPJudge(bundle, templates=("{}",), labels=LABELS, batch_size=4)  # 6 images: a padded 2nd batch
    assert judge.concept_names("object") == tuple(LABELS["object"])
    assert judge.concept_names("any") == tuple(LABELS["object"] + LABELS["style"])
    feats = judge.features(images)
    assert feats.shape == (6, PROJ) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    for domain, names in LABELS.items():
        ids = encode_prompts(bundle.tokenizer, names, bundle.max_length)
        with torch.no_grad():
            ref = model(input_ids=torch.as_tensor(ids, dtype=torch.long), pixel_values=to_torch_pixels(pixels))
        ref_logits = ref.logits_per_image.numpy()
        assert rel_err(feats, ref.image_embeds) <= TOL
        # one template "{}": our cosine x exp(logit_scale) is transformers' logits_per_image
        sims = judge.similarities(images, domain)
        assert rel_err(sims * np.exp(float(model.logit_scale.detach())), ref_logits) <= TOL
        ref_pred = ref_logits.argmax(1)
        assert judge.classify(images, domain) == [names[i] for i in ref_pred]
        hits = np.zeros(len(images), int)
        for j, name in enumerate(names):
            det = judge.detect(images, name, domain)
            assert det.dtype == bool and det.shape == (6,)
            np.testing.assert_array_equal(det, ref_pred == j, err_msg=f"{domain}/{name}")
            hits += det
        np.testing.assert_array_equal(hits, 1)  # argmax: exactly one label per image
    # CLIP score: 100 * max(cos, 0) of each image with its prompt (torchmetrics' CLIPScore per image)
    prompts = ["a photo of a cat", "a dog", "a horse", "a red car", "a bird", "oil on canvas"]
    ids = encode_prompts(bundle.tokenizer, prompts, bundle.max_length)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids, dtype=torch.long), pixel_values=to_torch_pixels(pixels))
    cos = (ref.image_embeds * ref.text_embeds).sum(-1).numpy()
    score = judge.alignment(images, prompts)
    np.testing.assert_allclose(score, 100 * np.maximum(cos, 0), atol=100 * TOL)
    assert score.shape == (6,) and (score >= 0).all()
    np.testing.assert_allclose(judge.alignment(images, "a dog"), judge.alignment(images, ["a dog"] * 6), atol=1e-6)
    with pytest.raises(ValueError, match="6 images but 2 prompts"):
        judge.alignment(images, prompts[:2])
    with pytest.raises(ConfigError, match="not a label of domain"):
        judge.detect(images, "van gogh", "object")
    with pytest.raises(ConfigError, match="unknown domain"):
        judge.concept_names("colour")


def test_judge_templates_and_threshold_mode(bundle):
    images = noise_images(6, 5, 32, 32)
    judge = CLIPJudge(bundle, labels=LABELS)  # default templates: "a photo of {}", "{}"
    feats = judge.features(images)
    # the ensembled label embedding: mean of the normalized template embeddings, renormalized
    emb = judge.text_features([f"a photo of {n}" for n in LABELS["style"]]) + judge.text_features(LABELS["style"])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(judge.label_embeddings("style"), emb, atol=1e-6)
    pred = (feats @ emb.T).argmax(1)
    for j, name in enumerate(LABELS["style"]):
        np.testing.assert_array_equal(judge.detect(images, name, "style"), pred == j)
    thr = CLIPJudge(bundle, labels=LABELS, mode="threshold", threshold=0.01, neutral_prompt="a photo")
    target = thr.label_embeddings("object")[1]  # "dog", ensembled the same way
    neutral = thr.text_features(["a photo"])[0]
    expected = feats @ target - feats @ neutral > 0.01
    np.testing.assert_array_equal(thr.detect(images, "dog", "object"), expected)
    assert thr.name != judge.name and thr.name.startswith("clip:")  # settings are part of the name
    assert CLIPJudge(bundle, labels=LABELS).name == judge.name


def test_judge_protocol_and_load_judge(clip_folder, bundle):
    from jaxforget.eval.judges import Judge, feature_kind, load_judge

    judge = load_judge(f"clip:{clip_folder[1]}", labels=LABELS, batch_size=8)
    assert isinstance(judge, CLIPJudge) and isinstance(judge, Judge) and feature_kind(judge) == "clip"
    assert judge.name == CLIPJudge(bundle, labels=LABELS).name  # same folder, same settings
    images = np.random.default_rng(0).random((3, 24, 24, 3), dtype=np.float32)  # float [0, 1], any size
    a = judge.features(images)
    a[:] = 0  # callers get copies: the memoized features stay intact
    np.testing.assert_array_equal(judge.features(images), CLIPJudge(bundle, labels=LABELS).features(images))
    assert judge.detect(images, "cat", "object").shape == (3,)


def test_judge_bad_settings(bundle):
    images = noise_images(6, 2, 32, 32)
    with pytest.raises(ConfigError, match="placeholder"):
        CLIPJudge(bundle, templates=("a photo",), labels=LABELS)
    with pytest.raises(ConfigError, match="mode must be one of"):
        CLIPJudge(bundle, labels=LABELS, mode="vote")
    with pytest.raises(ConfigError, match="single label"):
        CLIPJudge(bundle, labels={"object": ["cat"]}).detect(images, "cat", "object")


def test_labels_from_catalogue():
    class C:
        def __init__(self, name, domain):
            self.name, self.domain = name, domain

    class Cat:
        concepts = (C("circle", "object"), C("star", "object"), C("dots", "style"))

    got = labels_by_domain(catalogue=Cat())
    assert got == {"object": ("circle", "star"), "style": ("dots",), "any": ("circle", "star", "dots")}
    assert labels_by_domain(["a", "b  c"]) == {"any": ("a", "b c")}
    assert labels_by_domain({"object": ["x", "y"]}, catalogue=Cat())["object"] == ("x", "y")  # labels win
    with pytest.raises(ConfigError, match="needs labels"):
        labels_by_domain()


def test_export_loads_in_transformers(clip_folder, bundle):
    model, _, _ = clip_folder
    tensors = module_to_tensors(bundle.model, CLIP_MODEL_KEYS)
    fresh = transformers.CLIPModel(model.config).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    # and our config.json is read back by transformers
    cfg = transformers.CLIPConfig(**{k: v for k, v in bundle.config.to_transformers().items()
                                     if k not in ("architectures", "model_type")})
    assert CLIPConfig.from_transformers(cfg.to_dict()) == bundle.config


@pytest.mark.parametrize("arch", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_vision_only_folders(tmp_path, arch):
    cfg = transformers.CLIPVisionConfig(**VISION_CFG, projection_dim=PROJ)
    torch.manual_seed(1)
    model = perturb(getattr(transformers, arch)(cfg), seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)  # transformers 5: CLIPVisionModel keys un-prefixed
    jm = load_clip_vision_model(tmp_path, with_projection=arch.endswith("Projection"))
    pixels = preprocess_jit(jnp.asarray(noise_images(2, 2, 32, 32)), ImagePreprocess.for_image_size(IMAGE_SIZE))
    with torch.no_grad():
        ref = model(pixel_values=to_torch_pixels(pixels))
    out = nnx.jit(lambda m, x: m(x))(jm, pixels)
    if arch == "CLIPVisionModel":
        assert rel_err(out.pooled_output, ref.pooler_output) <= TOL
    else:
        assert rel_err(out.image_embeds, ref.image_embeds) <= TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    with pytest.raises(ValueError, match="doesn't match model"):
        jm(jnp.zeros((1, 16, 16, 3)))


# ----------------------------------------------------------------------------- bad folders
class _Payload:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_folder(src: Path, dst: Path, drop: tuple[str, ...]) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_bin_only_folder_refused(clip_folder, tmp_path):
    d = _bad_folder(clip_folder[1], tmp_path / "clip_bin", ("model.safetensors",))
    marker = tmp_path / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model\.bin: pickle-only weights are refused"):
        load_clip_model(d)
    with pytest.raises(CheckpointFormatError, match="pickle-only weights are refused"):
        CLIPJudge(d, labels=LABELS)
    assert not marker.exists()


def test_other_bad_folders(clip_folder, tmp_path):
    src = clip_folder[1]
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        load_clip_model(tmp_path / "nope")
    d = _bad_folder(src, tmp_path / "text_only", ())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg["text_config"]))
    with pytest.raises(CheckpointFormatError, match=r"config\.json: .*not a full CLIP model"):
        load_clip_model(d)
    d = _bad_folder(src, tmp_path / "no_tokenizer", ("vocab.json", "merges.txt"))
    with pytest.raises(CheckpointFormatError, match="missing tokenizer file"):
        load_clip_model(d)
    d = _bad_folder(src, tmp_path / "missing_tensor", ())
    t = load_file(d / "model.safetensors")
    t.pop("vision_model.post_layernorm.bias")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"missing tensors for CLIP model .*post_layernorm\.bias"):
        load_clip_model(d)
