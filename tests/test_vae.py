"""AutoencoderKL: parity with diffusers (tiny random fp32 model), legacy keys, export, loader errors.

Tolerance for every parity check: max relative error max|a-b| / max|b| <= 1e-4.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from jaxforget.errors import CheckpointFormatError, ConfigError
from jaxforget.io.vae_keys import VAE_KEYS
from jaxforget.io.weights import load_module_weights, module_to_tensors
from jaxforget.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, sample_posterior

TOL = 1e-4
WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=2,
    norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.13025, force_upcast=True,
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def torch_vae(seed: int = 0, **overrides) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # perturb everything (norm scales, zero biases) so that all of it is tested
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = torch_vae()
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(nchw(x))).latent_dist
        dec = model.decode(torch.from_numpy(nchw(z))).sample
    ref = {"mean": post.mean.numpy(), "logvar": post.logvar.numpy(), "decoded": dec.numpy()}
    return model, folder, x, z, ref


def load(folder: Path) -> AutoencoderKL:
    cfg = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    return load_module_weights(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)), folder, VAE_KEYS)


def outputs(vae: AutoencoderKL, x, z) -> dict[str, np.ndarray]:
    post = vae.encode(jnp.asarray(x))
    return {"mean": nchw(post.mean), "logvar": nchw(post.logvar), "decoded": nchw(vae.decode(jnp.asarray(z)))}


def assert_close(got: dict, ref: dict, label: str) -> None:
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    print(label, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs


def test_parity_with_diffusers(case):
    model, folder, x, z, ref = case
    vae = load(folder)
    assert vae.config.scaling_factor == pytest.approx(0.13025)
    assert_close(outputs(vae, x, z), ref, "vae")


def test_legacy_attention_names_load(case, tmp_path):
    model, folder, x, z, ref = case
    d = shutil.copytree(folder, tmp_path / "vae_legacy")
    tensors = load_file(d / WEIGHTS)
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = 0
    for k, v in tensors.items():
        for new, old in names.items():
            tag = f".attentions.0.{new}."
            if tag in k:
                k = k.replace(tag, f".attentions.0.{old}.")
                if v.ndim == 2:  # stored as a 1x1 conv, as some converted checkpoints do
                    v = v[:, :, None, None].contiguous()
                renamed += 1
        legacy[k] = v
    assert renamed == 16  # encoder + decoder: 4 projections x (weight, bias)
    assert not any(".to_q." in k for k in legacy)
    save_file(legacy, d / WEIGHTS, metadata={"format": "pt"})
    assert_close(outputs(load(d), x, z), ref, "vae legacy")


def test_config_round_trip(case):
    _, folder, *_ = case
    d = json.loads((folder / "config.json").read_text())
    cfg = VAEConfig.from_diffusers(d)
    assert cfg.block_out_channels == (8, 16) and cfg.layers_per_block == 2 and cfg.norm_num_groups == 4
    back = cfg.to_diffusers()
    assert VAEConfig.from_diffusers(back) == cfg
    assert VAEConfig.from_diffusers(dict(diffusers.AutoencoderKL.from_config(back).config)) == cfg
    with pytest.raises(ConfigError, match="unsupported down block type"):
        VAEConfig.from_diffusers({**d, "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]})
    with pytest.raises(ConfigError, match="not divisible by norm_num_groups"):
        VAEConfig.from_diffusers({**d, "block_out_channels": [8, 18]})


def test_export_round_trip(case):
    model, folder, x, z, ref = case
    tensors = module_to_tensors(load(folder), VAE_KEYS)
    fresh = torch_vae(seed=1)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    with torch.no_grad():
        dec = fresh.decode(torch.from_numpy(nchw(z))).sample.numpy()
        mean = fresh.encode(torch.from_numpy(nchw(x))).latent_dist.mean.numpy()
    assert rel_err(dec, ref["decoded"]) <= TOL and rel_err(mean, ref["mean"]) <= TOL


def test_posterior_sampling_and_call(case):
    _, folder, x, *_ = case
    vae = load(folder)
    post = vae.encode(jnp.asarray(x))
    key = jax.random.key(3)
    s = sample_posterior(post, key)
    np.testing.assert_allclose(s, post.mean + jnp.exp(0.5 * post.logvar) * jax.random.normal(key, post.mean.shape))
    assert not np.allclose(s, post.mean)
    clipped = DiagonalGaussian(post.mean, jnp.full_like(post.logvar, -30.0))
    np.testing.assert_allclose(clipped.sample(key), post.mean, atol=1e-5)
    np.testing.assert_allclose(vae(jnp.asarray(x)), vae.decode(post.mean), rtol=1e-6, atol=1e-6)
    assert vae(jnp.asarray(x), key=key).shape == x.shape


# ----------------------------------------------------------------------------- bad inputs
class _Payload:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def test_missing_component_folder(tmp_path):
    with pytest.raises(CheckpointFormatError, match="missing component folder"):
        load_module_weights(lambda: AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0)), tmp_path / "vae", VAE_KEYS)


def test_pickle_only_refused_and_never_unpickled(case, tmp_path):
    marker, probe = tmp_path / "UNPICKLED", tmp_path / "probe_marker"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload works: unpickling creates a file
    assert probe.exists()
    d = tmp_path / "vae"
    d.mkdir()
    shutil.copy(case[1] / "config.json", d / "config.json")
    (d / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointFormatError, match="pickle-only weights are refused"):
        load(d)
    assert not marker.exists()


def test_missing_unexpected_shape_truncated(case, tmp_path):
    folder = case[1]
    d = shutil.copytree(folder, tmp_path / "missing")
    _rewrite(d, lambda t: t.pop("decoder.up_blocks.1.resnets.2.conv2.bias"))
    with pytest.raises(CheckpointFormatError, match=r"missing tensors for AutoencoderKL .*resnets\.2\.conv2\.bias"):
        load(d)

    d = shutil.copytree(folder, tmp_path / "unexpected")
    _rewrite(d, lambda t: t.__setitem__("encoder.down_blocks.1.downsamplers.0.conv.weight", torch.zeros(16, 16, 3, 3)))
    with pytest.raises(CheckpointFormatError, match=r"unexpected tensors .*down_blocks\.1\.downsamplers"):
        load(d)

    d = shutil.copytree(folder, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["block_out_channels"] = [8, 32]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="shape mismatch for .*file has"):
        load(d)

    d = shutil.copytree(folder, tmp_path / "truncated")
    f = d / WEIGHTS
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        load(d)


@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
def test_sharded_and_low_precision(case, tmp_path, stored):
    model, folder, x, z, ref = case
    tensors = {k: v.to(getattr(torch, stored)) for k, v in load_file(folder / WEIGHTS).items()}
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    d = tmp_path / "vae"
    d.mkdir()
    shutil.copy(folder / "config.json", d / "config.json")
    weight_map = {}
    for fname, names in shards.items():
        save_file({k: tensors[k] for k in names}, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    (d / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vae = load(d)
    got = module_to_tensors(vae, VAE_KEYS)
    for k, v in got.items():  # exactly the stored values, widened to the fp32 parameters
        np.testing.assert_array_equal(v, tensors[k].float().numpy(), err_msg=k)
    assert all(v[...].dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)))
    if stored == "float32":
        assert_close(outputs(vae, x, z), ref, "vae sharded")
