"""CLIP text encoders: parity with transformers (tiny random fp32 models) and loader errors.

Tolerance for every parity check: max relative error max|a-b| / max|b| <= 1e-4.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from jaxforget.errors import CheckpointFormatError, ConfigError
from jaxforget.io.clip_keys import CLIP_TEXT_KEYS, strip_text_model_prefix
from jaxforget.io.weights import load_module_weights, module_to_tensors, save_tensors
from jaxforget.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    penultimate_hidden_state,
    pooled_positions,
)

TOL = 1e-4
BASE = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=12, projection_dim=24, pad_token_id=1)
# name -> (architecture, transformers config overrides)
VARIANTS = {
    "legacy_eos2_quick_gelu": ("CLIPTextModel", dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)),
    "eos3_quick_gelu": ("CLIPTextModel", dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=3)),
    "projection_gelu": ("CLIPTextModelWithProjection", dict(hidden_act="gelu", bos_token_id=0, eos_token_id=3)),
}
# Rows are built so the two pooling rules disagree: id 2 / id 3 appear before the largest id
# (98), and eos 3 appears twice (padding with the eos id, as SD2 tokenizers do).
IDS = np.array([
    [0, 17, 2, 45, 98, 3, 3, 3, 3, 3, 3, 3],
    [0, 98, 60, 3, 70, 97, 2, 5, 3, 8, 9, 1],
], dtype=np.int32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_model(arch: str, overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(**BASE, **overrides)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # perturb everything, so LN scales/biases and zero biases are tested too
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours(arch: str):
    return CLIPTextModel if arch == "CLIPTextModel" else CLIPTextModelWithProjection


def build_fn(arch: str, cfg: CLIPTextConfig):
    return lambda: ours(arch)(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """For each variant: (torch model, SD-layout folder, transformers-5 save_pretrained folder)."""
    out = {}
    for name, (arch, overrides) in VARIANTS.items():
        model = torch_model(arch, overrides)
        native = tmp_path_factory.mktemp(f"{name}_native")
        model.save_pretrained(native, safe_serialization=True)
        # the real SD layout: every text-model key under text_model., plus the position_ids buffer
        sd_dir = tmp_path_factory.mktemp(f"{name}_sd")
        shutil.copy(native / "config.json", sd_dir / "config.json")
        tensors = load_file(native / "model.safetensors")
        tensors = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                   for k, v in tensors.items()}
        tensors["text_model.embeddings.position_ids"] = torch.arange(BASE["max_position_embeddings"])[None]
        save_file(tensors, sd_dir / "model.safetensors", metadata={"format": "pt"})
        out[name] = (model, sd_dir, native)
    return out


def load(arch: str, folder: Path):
    cfg = CLIPTextConfig.from_transformers(json.loads((folder / "config.json").read_text()))
    return load_module_weights(build_fn(arch, cfg), folder, CLIP_TEXT_KEYS)


def reference(model, ids=IDS):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_with_transformers(folders, name):
    arch, overrides = VARIANTS[name]
    model, sd_dir, _ = folders[name]
    ref = reference(model)
    jm = load(arch, sd_dir)
    out = jm(jnp.asarray(IDS), output_hidden_states=True)
    errs = {"last_hidden_state": rel_err(out.last_hidden_state, ref.last_hidden_state)}
    assert len(out.hidden_states) == len(ref.hidden_states) == BASE["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        errs[f"hidden_states[{i}]"] = rel_err(a, b)
    errs["penultimate"] = rel_err(penultimate_hidden_state(out), ref.hidden_states[-2])
    if arch == "CLIPTextModel":
        errs["pooled"] = rel_err(out.pooled_output, ref.pooler_output)
    else:
        errs["text_embeds"] = rel_err(out.text_embeds, ref.text_embeds)
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs


def test_pooled_positions_rule():
    # the inputs above must discriminate the two rules, or the parity test proves nothing
    legacy = np.asarray(pooled_positions(jnp.asarray(IDS), 2))
    first_eos = np.asarray(pooled_positions(jnp.asarray(IDS), 3))
    np.testing.assert_array_equal(legacy, [4, 1])
    np.testing.assert_array_equal(first_eos, [5, 3])


def test_prefixless_layout_loads_same(folders):
    for name in ("eos3_quick_gelu", "projection_gelu"):
        arch, _ = VARIANTS[name]
        model, sd_dir, native = folders[name]
        a = module_to_tensors(load(arch, sd_dir), CLIP_TEXT_KEYS)
        b = module_to_tensors(load(arch, native), CLIP_TEXT_KEYS)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # the native CLIPTextModel file really is prefix-less (transformers 5), so the alias was used
    keys = load_file(folders["eos3_quick_gelu"][2] / "model.safetensors").keys()
    assert not any(k.startswith("text_model.") for k in keys)


def test_config_round_trip(folders):
    for name, (arch, overrides) in VARIANTS.items():
        d = json.loads((folders[name][1] / "config.json").read_text())
        cfg = CLIPTextConfig.from_transformers(d)
        assert cfg.hidden_act == overrides["hidden_act"] and cfg.eos_token_id == overrides["eos_token_id"]
        assert cfg.num_hidden_layers == 3 and cfg.max_position_embeddings == 12 and cfg.projection_dim == 24
        back = cfg.to_transformers(arch)
        assert back["architectures"] == [arch]
        tcfg = transformers.CLIPTextConfig(**{k: v for k, v in back.items() if k not in ("architectures", "model_type")})
        assert CLIPTextConfig.from_transformers(tcfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="not divisible"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="unknown architecture"):
        CLIPTextConfig().to_transformers("CLIPVisionModel")


def test_export_round_trip(folders, tmp_path):
    for name in ("eos3_quick_gelu", "projection_gelu"):
        arch, overrides = VARIANTS[name]
        model, sd_dir, _ = folders[name]
        jm = load(arch, sd_dir)
        tensors = module_to_tensors(jm, CLIP_TEXT_KEYS)
        assert all(k.startswith(("text_model.", "text_projection.")) for k in tensors)  # SD layout
        fresh = torch_model(arch, overrides, seed=1)
        state = tensors if arch == "CLIPTextModelWithProjection" else strip_text_model_prefix(tensors)
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        a, b = reference(fresh), reference(model)
        assert rel_err(a.last_hidden_state, b.last_hidden_state) <= TOL
        # and as a folder: canonical safetensors + our config.json, read by from_pretrained
        out_dir = tmp_path / name
        save_tensors(tensors, out_dir / "model.safetensors")
        (out_dir / "config.json").write_text(json.dumps(jm.config.to_transformers(arch)))
        reread = getattr(transformers, arch).from_pretrained(out_dir).eval()
        c = reference(reread)
        assert rel_err(c.last_hidden_state, b.last_hidden_state) <= TOL
        if arch == "CLIPTextModelWithProjection":
            assert rel_err(c.text_embeds, b.text_embeds) <= TOL


# ----------------------------------------------------------------------------- bad inputs
class _Payload:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_component_folder(tmp_path):
    with pytest.raises(CheckpointFormatError, match="missing component folder"):
        load_module_weights(build_fn("CLIPTextModel", CLIPTextConfig(**BASE)), tmp_path / "text_encoder",
                            CLIP_TEXT_KEYS)


def test_pickle_only_refused_and_never_unpickled(folders, tmp_path):
    marker = tmp_path / "UNPICKLED"
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload works: unpickling creates a file
    assert probe.exists()
    d = tmp_path / "text_encoder"
    d.mkdir()
    shutil.copy(folders["eos3_quick_gelu"][1] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointFormatError, match="pickle-only weights are refused"):
        load("CLIPTextModel", d)
    assert not marker.exists()


def test_missing_tensor(folders, tmp_path):
    d = _copy(folders["eos3_quick_gelu"][1], tmp_path / "te")
    _rewrite(d, lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointFormatError, match=r"missing tensors .*layers\.1\.mlp\.fc2\.bias"):
        load("CLIPTextModel", d)


def test_unexpected_tensor(folders, tmp_path):
    d = _copy(folders["eos3_quick_gelu"][1], tmp_path / "te")
    _rewrite(d, lambda t: t.__setitem__("text_projection.weight", torch.zeros(24, 32)))
    with pytest.raises(CheckpointFormatError, match=r"unexpected tensors .*text_projection\.weight"):
        load("CLIPTextModel", d)


def test_shape_mismatch(folders, tmp_path):
    d = _copy(folders["eos3_quick_gelu"][1], tmp_path / "te")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match=r"shape mismatch for text_model\..*file has"):
        load("CLIPTextModel", d)


def test_truncated_file(folders, tmp_path):
    d = _copy(folders["eos3_quick_gelu"][1], tmp_path / "te")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        load("CLIPTextModel", d)


@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
def test_sharded_and_low_precision(folders, tmp_path, stored):
    arch, _ = VARIANTS["projection_gelu"]
    model, sd_dir, _ = folders["projection_gelu"]
    tdtype = getattr(torch, stored)
    tensors = {k: v.to(tdtype) for k, v in load_file(sd_dir / "model.safetensors").items()}
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    d = tmp_path / "te"
    d.mkdir()
    shutil.copy(sd_dir / "config.json", d / "config.json")
    weight_map = {}
    for fname, names in shards.items():
        save_file({k: tensors[k] for k in names}, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    jm = load(arch, d)
    got = module_to_tensors(jm, CLIP_TEXT_KEYS)
    for k, v in got.items():  # exactly the stored values, widened to the fp32 parameters
        np.testing.assert_array_equal(v, tensors[k].float().numpy(), err_msg=k)
    leaves = [v[...] for _, v in nnx.to_flat_state(nnx.state(jm, nnx.Param))]
    assert all(x.dtype == jnp.float32 for x in leaves)
    if stored == "float32":
        ref = reference(model)
        out = jm(jnp.asarray(IDS), output_hidden_states=True)
        assert rel_err(out.text_embeds, ref.text_embeds) <= TOL
