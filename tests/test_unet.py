"""Parity of the NNX UNet2DConditionModel with diffusers on tiny random SD1 / SD2 / SDXL-like UNets.

Each reference model is built with torch.manual_seed, every parameter is perturbed (so norms are
not identity and nothing is trivially zero), saved with diffusers' save_pretrained
(safetensors) and loaded through jaxforget's loader from that folder, config included.

Tolerance: full forward output in fp32, max relative error max|a-b| / max|b| <= 1e-4.
Attention probabilities (values in [0, 1]): max absolute error <= 1e-5.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from jaxforget.errors import CheckpointFormatError, ConfigError
from jaxforget.io.unet_keys import UNET_KEYS
from jaxforget.io.weights import load_module_weights, module_to_tensors, to_torch_layout
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig

REL_TOL = 1e-4  # max|a-b| / max|b|, fp32 forward
PROB_TOL = 1e-5  # max abs error of attention probabilities

BASE = dict(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8)
CONFIGS = {
    # SD1: 1x1 conv proj_in/out, per-block head counts (stored in attention_head_dim)
    "sd1": dict(BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=(2, 4)),
    # SD2: linear proj_in/out, head dim 8 (4 and 8 heads), upcast_attention; odd input size below
    "sd2": dict(BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True),
    # SDXL: DownBlock2D first, 2 transformer layers in the last level, text_time added embedding
    "sdxl": dict(BASE, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=(2, 4), transformer_layers_per_block=[1, 2], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 16),
}
POOLED_DIM = 16
PROBES = np.array([[0, 3], [5, 1]], np.int32)  # [B, K] key positions, different per example


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def build_torch(cfg: dict) -> TorchUNet:
    torch.manual_seed(0)
    model = TorchUNet(**cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # perturb everything: norms off identity, no zero biases;
            # large enough that e.g. tanh-GELU instead of exact GELU breaks the tolerance
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_inputs(name: str) -> dict:
    rng = np.random.default_rng(0)
    hw = (7, 10) if name == "sd2" else (8, 8)  # sd2: sizes not multiple of 2 -> explicit upsample sizes
    cfg = CONFIGS[name]
    inputs = {
        "sample": rng.standard_normal((2, 4, *hw)).astype(np.float32),  # NCHW for torch
        "timesteps": np.array([10.0, 617.0], np.float32) if name != "sd1" else 999,
        "context": rng.standard_normal((2, 6, cfg["cross_attention_dim"])).astype(np.float32),
        "added": None,
    }
    if name == "sdxl":
        inputs["added"] = {
            "text_embeds": rng.standard_normal((2, POOLED_DIM)).astype(np.float32),
            "time_ids": np.array([[64, 64, 0, 0, 64, 64], [48, 80, 4, 8, 64, 64]], np.float32),
        }
    return inputs


def torch_forward(model: TorchUNet, inputs: dict) -> np.ndarray:
    t = inputs["timesteps"]
    added = None if inputs["added"] is None else {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["sample"]), torch.from_numpy(t) if isinstance(t, np.ndarray) else t,
                    torch.from_numpy(inputs["context"]), added_cond_kwargs=added).sample
    return out.numpy().transpose(0, 2, 3, 1)  # -> NHWC


@nnx.jit
def jax_forward(model, sample, timesteps, context, added, probe_tokens):
    return model(sample, timesteps, context, added_cond=added, probe_tokens=probe_tokens)


class Case:
    def __init__(self, name: str, tmp_path_factory):
        self.name = name
        self.torch_model = build_torch(CONFIGS[name])
        self.folder = tmp_path_factory.mktemp(name) / "unet"
        self.torch_model.save_pretrained(self.folder, safe_serialization=True)
        self.config = UNetConfig.from_diffusers(json.loads((self.folder / "config.json").read_text()))
        self.model = load_module_weights(
            lambda: UNet2DConditionModel(self.config, rngs=nnx.Rngs(0)), self.folder, UNET_KEYS)
        self.inputs = make_inputs(name)
        self.torch_out = torch_forward(self.torch_model, self.inputs)
        probe = jnp.asarray(PROBES) if name == "sd1" else None  # one compile per config
        inp = self.inputs
        self.jax_out = jax_forward(self.model, jnp.asarray(inp["sample"].transpose(0, 2, 3, 1)),
                                   jnp.asarray(inp["timesteps"]), jnp.asarray(inp["context"]),
                                   None if inp["added"] is None else jax.tree.map(jnp.asarray, inp["added"]),
                                   probe)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = Case(name, tmp_path_factory)
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_diffusers(cases, name):
    case = cases(name)
    out = np.asarray(case.jax_out.sample)
    assert out.shape == case.torch_out.shape
    assert np.abs(case.torch_out).max() > 1e-2  # the reference is not trivially ~0
    err = rel_err(out, case.torch_out)
    print(f"{name}: max rel err {err:.2e}")
    assert err <= REL_TOL


def test_config_reads_diffusers_quirks(cases):
    cfg = cases("sdxl").config
    assert cfg.num_attention_heads == (2, 4)  # from attention_head_dim
    assert cfg.down_transformer_layers(1) == (2,) and cfg.up_transformer_layers(0) == (2, 2)
    assert cfg.mid_transformer_layers() == 2
    assert cases("sd2").config.use_linear_projection and cases("sd2").config.upcast_attention
    # num_attention_heads, when given, wins over attention_head_dim
    d = dict(cases("sd1").config.to_diffusers(), num_attention_heads=[4, 8])
    assert UNetConfig.from_diffusers(d).num_attention_heads == (4, 8)


class RecordingProcessor:
    """Classic attention math that records the softmax probabilities [B, heads, Lq, Lk]."""

    def __init__(self, name: str, store: dict):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, None)  # [B*heads, Lq, Lk]
        self.store[self.name] = probs.reshape(b, attn.heads, *probs.shape[1:]).numpy()
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def test_probe_tokens_match_diffusers_attention_probabilities(cases):
    case = cases("sd1")
    store: dict[str, np.ndarray] = {}
    original = dict(case.torch_model.attn_processors)
    procs = {k: RecordingProcessor(k.removesuffix(".processor"), store) for k in case.torch_model.attn_processors}
    case.torch_model.set_attn_processor(procs)
    try:
        out = torch_forward(case.torch_model, case.inputs)
    finally:
        case.torch_model.set_attn_processor(original)
    assert rel_err(out, case.torch_out) <= REL_TOL  # the recorder computes the same attention
    probes = case.jax_out.attn_probes
    expected = {k: v for k, v in store.items() if k.endswith("attn2")}
    assert set(probes) == set(expected) and len(probes) == 4
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in probes
    for name, full in expected.items():
        b, heads, lq, _ = full.shape
        want = np.take_along_axis(full, PROBES[:, None, None, :].repeat(heads, 1).repeat(lq, 2), axis=-1)
        got = np.asarray(probes[name])
        assert got.dtype == np.float32 and got.shape == (2, heads, lq, PROBES.shape[1])
        assert np.abs(got - want).max() <= PROB_TOL, name
    # mid block: 64 channels, 4 heads, 2x2 latent
    assert probes["mid_block.attentions.0.transformer_blocks.0.attn2"].shape == (2, 4, 16, 2)
    assert cases("sd2").jax_out.attn_probes == {}  # no probe_tokens -> empty dict


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip_loads_strict_in_diffusers(cases, name):
    case = cases(name)
    tensors = module_to_tensors(case.model, UNET_KEYS)
    reference = TorchUNet.from_config(case.config.to_diffusers())
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    out = torch_forward(reference.eval(), case.inputs)
    assert rel_err(out, case.torch_out) <= 1e-6  # exact copy of the weights
    assert rel_err(np.asarray(case.jax_out.sample), out) <= REL_TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(cases, name):
    cfg = cases(name).config
    d = cfg.to_diffusers()
    assert d["_class_name"] == "UNet2DConditionModel" and d["num_attention_heads"] is None
    assert "prediction_type" not in d
    assert UNetConfig.from_diffusers(json.loads(json.dumps(d))) == cfg
    hash(cfg)  # frozen and hashable (usable as a static jit argument)


def test_shape_mismatch_names_the_key(cases):
    case = cases("sd1")
    wrong = UNetConfig.from_diffusers(dict(case.config.to_diffusers(), cross_attention_dim=48))
    with pytest.raises(CheckpointFormatError, match=r"shape mismatch for \S*attn2\.to_k\.weight"):
        load_module_weights(lambda: UNet2DConditionModel(wrong, rngs=nnx.Rngs(0)), case.folder, UNET_KEYS)


@pytest.mark.parametrize("field,value", [
    ("class_embed_type", "timestep"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("addition_embed_type", "text"),
    ("time_cond_proj_dim", 16),
    ("only_cross_attention", [True, False]),
    ("block_out_channels", [32, 60]),
])
def test_unsupported_config_is_refused_naming_the_field(field, value):
    d = UNetConfig.from_diffusers(CONFIGS["sd1"]).to_diffusers()
    d[field] = value
    with pytest.raises(ConfigError, match=field):
        UNetConfig.from_diffusers(d)


SD15 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}


def test_full_size_config_has_diffusers_state_dict():
    """Real SD1.5 config.json: the abstract NNX model has exactly diffusers' keys and shapes."""
    d, n_params = SD15, 859_520_964
    cfg = UNetConfig.from_diffusers(d)
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    ours = {UNET_KEYS.torch_key(path): to_torch_layout(path, np.empty(v.shape, np.int8)).shape
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    with torch.device("meta"):  # shapes only, no memory
        reference = TorchUNet.from_config(d)
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert sum(int(np.prod(s)) for s in ours.values()) == n_params


def test_logical_axes(cases):
    flat = {UNET_KEYS.torch_key(p): v for p, v in nnx.to_flat_state(nnx.state(cases("sdxl").model, nnx.Param))}
    for key, var in flat.items():
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, key
    block = "down_blocks.1.attentions.0.transformer_blocks.1."
    assert flat[block + "attn2.to_k.weight"].logical_axes == ("embed", "heads")
    assert flat[block + "attn1.to_out.0.weight"].logical_axes == ("heads", "embed")
    assert flat[block + "ff.net.0.proj.weight"].logical_axes == ("embed", "mlp")
    assert flat[block + "ff.net.2.weight"].logical_axes == ("mlp", "embed")
    assert flat["conv_in.weight"].logical_axes == (None, None, "conv_in", "conv_out")


def test_bf16_compute_keeps_fp32_params_and_probes(cases):
    case = cases("sd1")
    model = load_module_weights(
        lambda: UNet2DConditionModel(case.config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), case.folder, UNET_KEYS)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    inp = case.inputs
    out = jax_forward(model, jnp.asarray(inp["sample"].transpose(0, 2, 3, 1)), jnp.asarray(inp["timesteps"]),
                      jnp.asarray(inp["context"]), None, jnp.asarray(PROBES))
    assert out.sample.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out.sample, np.float32), case.torch_out) <= 5e-2  # bf16: ~8 mantissa bits
    for name, p in out.attn_probes.items():
        assert p.dtype == jnp.float32
        # bf16 q/k and activations: errors compound with depth (~0.02 first layer, ~0.06 last)
        assert np.abs(np.asarray(p) - np.asarray(case.jax_out.attn_probes[name])).max() <= 0.1, name


# ----------------------------------------------------------------------------- small-output convolutions
@pytest.mark.parametrize("hw, stride, padding, ksize", [
    ((2, 2), 1, ((1, 1), (1, 1)), 3),   # a resnet conv at the deepest level of the toy world
    ((4, 4), 2, ((1, 1), (1, 1)), 3),   # a downsampler into 2x2
    ((3, 2), 2, ((0, 1), (1, 0)), 3),   # asymmetric padding, odd size
    ((1, 1), 1, ((1, 1), (1, 1)), 3),
    ((5, 5), 1, ((0, 0), (0, 0)), 4),
])
def test_conv_as_patches_matches_lax_conv(hw, stride, padding, ksize):
    # values and both gradients within fp32 summation-order noise (abs 1e-5 at unit-scale inputs)
    from jaxforget.models.layers import conv_as_patches

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, *hw, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((ksize, ksize, 5, 7)) * 0.3, jnp.float32)

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def patches(x, w):
        return conv_as_patches(x, w, stride, padding)

    np.testing.assert_allclose(patches(x, w), ref(x, w), atol=1e-5, rtol=0)
    weights = jnp.asarray(rng.standard_normal(ref(x, w).shape), jnp.float32)
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * weights), argnums=(0, 1))(x, w)
    g_pat = jax.grad(lambda x, w: jnp.sum(patches(x, w) * weights), argnums=(0, 1))(x, w)
    for a, b in zip(g_pat, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_conv2d_takes_the_patches_path_only_for_tiny_outputs():
    from jaxforget.models.layers import Conv2d

    conv = Conv2d(4, 8, 3, rngs=nnx.Rngs(0))
    down = Conv2d(4, 8, 3, stride=2, rngs=nnx.Rngs(0))

    def primitives(layer, hw):
        x = jnp.zeros((1, *hw, 4))
        jaxpr = jax.make_jaxpr(lambda x: layer(x))(x)
        return {e.primitive.name for e in jaxpr.eqns}

    assert "conv_general_dilated" not in primitives(conv, (2, 2)) and "dot_general" in primitives(conv, (2, 2))
    assert "conv_general_dilated" not in primitives(down, (4, 4))  # 2x2 output
    assert "conv_general_dilated" in primitives(conv, (4, 4))
    assert "conv_general_dilated" in primitives(down, (8, 8))


def test_forward_with_2x2_levels_matches_diffusers(cases):
    # a 4x4 latent puts the sd1 case's second level at 2x2 (its downsampler and resnet convs take
    # the patches path); same tolerance as the full-size forward
    case = cases("sd1")
    inp = dict(case.inputs, sample=np.random.default_rng(3).standard_normal((2, 4, 4, 4)).astype(np.float32))
    want = torch_forward(case.torch_model, inp)
    got = jax_forward(case.model, jnp.asarray(inp["sample"].transpose(0, 2, 3, 1)), jnp.asarray(inp["timesteps"]),
                      jnp.asarray(inp["context"]), None, None)
    err = rel_err(np.asarray(got.sample), want)
    print(f"sd1 at 4x4: max rel err {err:.2e}")
    assert err <= REL_TOL
