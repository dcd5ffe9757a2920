"""Whole diffusers pipeline folders in and out (jaxforget.io.diffusers_folder).

Tiny random SD1 / SD2 / SDXL-like folders come from tests/tiny_pipelines.py (saved by diffusers'
save_pretrained, real hub layout). The PyTorch reference is the same folder read back by
diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained.

Tolerance (fp32 everywhere): max relative error max|a-b| / max|b| <= 1e-4 for UNet outputs, VAE
decodes and text encoder outputs. Round trips are bit-exact (params_hash, torch state dicts).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxforget.errors import CheckpointFormatError
from jaxforget.io import diffusers_folder as F
from jaxforget.io.diffusers_folder import export_model_folder, folder_hash, load_model_folder, params_hash
from tiny_pipelines import (  # pytest puts tests/ (no __init__.py) on sys.path
    ADD_TIME_DIM,
    KINDS,
    LATENT_SIZE,
    POOLED_DIM,
    UNET_CONFIGS,
    build_sd_folder,
    load_torch_pipeline,
)

REL_TOL = 1e-4  # max|a-b| / max|b|, fp32
PROMPTS = ["a photo of a cat", "a painting of a red dog, oil on canvas"]
NETS = ("unet", "vae", "text_encoder", "text_encoder_2")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def unet_inputs(kind: str) -> dict:
    rng = np.random.default_rng(1)
    inputs = {
        "sample": rng.standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32),  # NCHW
        "timesteps": np.array([10.0, 617.0], np.float32),
        "context": rng.standard_normal((2, 7, UNET_CONFIGS[kind]["cross_attention_dim"])).astype(np.float32),
        "added": None,
    }
    if kind == "sdxl":
        inputs["added"] = {"text_embeds": rng.standard_normal((2, POOLED_DIM)).astype(np.float32),
                           "time_ids": np.array([[16, 16, 0, 0, 16, 16], [12, 20, 2, 1, 16, 16]], np.float32)}
    return inputs


def torch_unet(unet, inputs: dict) -> np.ndarray:
    added = None if inputs["added"] is None else {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
    with torch.no_grad():
        out = unet(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                   torch.from_numpy(inputs["context"]), added_cond_kwargs=added).sample
    return out.numpy().transpose(0, 2, 3, 1)  # NHWC


@nnx.jit
def _jax_unet(unet, sample, timesteps, context, added):
    return unet(sample, timesteps, context, added_cond=added).sample


def jax_unet(unet, inputs: dict) -> np.ndarray:
    added = None if inputs["added"] is None else jax.tree.map(jnp.asarray, inputs["added"])
    return np.asarray(_jax_unet(unet, jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)),
                                jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["context"]), added))


@nnx.jit
def _jax_text(encoder, ids):
    return encoder(ids, output_hidden_states=True)


@nnx.jit
def _jax_decode(vae, z):
    return vae.decode(z)


def state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in NETS if getattr(pipe, name, None) is not None}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: build_sd_folder(root / kind, kind, seed=i) for i, kind in enumerate(KINDS)}


class Case:
    """One folder loaded both ways, and the UNet outputs on a fixed input (reused by round trips)."""

    def __init__(self, kind: str, folder: Path):
        self.kind, self.folder = kind, folder
        self.pipe = load_torch_pipeline(folder)
        self.model = load_model_folder(folder)
        self.inputs = unet_inputs(kind)
        self.torch_out = torch_unet(self.pipe.unet, self.inputs)
        self.jax_out = jax_unet(self.model.unet, self.inputs)


@pytest.fixture(scope="module", params=KINDS)
def case(request, folders) -> Case:
    return Case(request.param, folders[request.param])


# ----------------------------------------------------------------------------- 1. loading
def test_components_match_torch(case):
    model, pipe = case.model, case.pipe
    assert model.is_sdxl == (case.kind == "sdxl")
    assert model.path == case.folder and model.model_index["_class_name"] == type(pipe).__name__
    assert model.scheduler_config["_class_name"] == type(pipe.scheduler).__name__
    assert model.scheduler_config["prediction_type"] == pipe.scheduler.config.prediction_type
    assert model.tokenizer.model_max_length == 77

    # UNet (the outputs are non-trivial: not near zero, different per example)
    assert np.abs(case.torch_out).max() > 0.1
    assert np.abs(case.torch_out[0] - case.torch_out[1]).max() > 0.1
    err = rel_err(case.jax_out, case.torch_out)
    print(f"{case.kind} unet rel err {err:.2e}")
    assert err <= REL_TOL

    # VAE decode
    z = np.random.default_rng(2).standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32)
    with torch.no_grad():
        want = pipe.vae.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(_jax_decode(model.vae, jnp.asarray(z.transpose(0, 2, 3, 1))))
    err = rel_err(got, want)
    print(f"{case.kind} vae decode rel err {err:.2e}")
    assert got.shape == (2, 2 * LATENT_SIZE, 2 * LATENT_SIZE, 3) and err <= REL_TOL

    # tokenizers and text encoders, on the same ids
    pairs = [(model.tokenizer, pipe.tokenizer, model.text_encoder, pipe.text_encoder)]
    if model.is_sdxl:
        pairs.append((model.tokenizer_2, pipe.tokenizer_2, model.text_encoder_2, pipe.text_encoder_2))
    for i, (tok, ttok, enc, tenc) in enumerate(pairs):
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
        tids = ttok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        np.testing.assert_array_equal(ids, tids.numpy())
        with torch.no_grad():
            t = tenc(tids, output_hidden_states=True)
        o = _jax_text(enc, jnp.asarray(ids, jnp.int32))
        checks = {"last_hidden_state": (o.last_hidden_state, t.last_hidden_state),
                  "penultimate": (o.hidden_states[-2], t.hidden_states[-2])}
        if i == 0:
            checks["pooled"] = (o.pooled_output, t.pooler_output)
        else:
            checks["text_embeds"] = (o.text_embeds, t.text_embeds)
        for name, (a, b) in checks.items():
            err = rel_err(a, b.numpy())
            print(f"{case.kind} text_encoder{'_2' if i else ''} {name} rel err {err:.2e}")
            assert err <= REL_TOL, name


# ----------------------------------------------------------------------------- 2. round trips
def test_export_round_trip(case, tmp_path):
    out = export_model_folder(case.model, tmp_path / "exported")
    assert out == tmp_path / "exported" and sorted(os.listdir(tmp_path)) == ["exported"]  # no temp left
    pipe = load_torch_pipeline(out)
    assert type(pipe) is type(case.pipe)
    # diffusers reads exactly the original tensors back, for every network
    want, got = state_dicts(case.pipe), state_dicts(pipe)
    assert set(got) == set(want)
    for name in want:
        assert set(got[name]) == set(want[name]), name
        for key, value in want[name].items():
            assert torch.equal(got[name][key], value), f"{name}.{key}"
    assert dict(pipe.scheduler.config) == dict(case.pipe.scheduler.config)
    # the exported torch UNet computes what the JAX UNet computes
    err = rel_err(case.jax_out, torch_unet(pipe.unet, case.inputs))
    print(f"{case.kind} exported unet rel err {err:.2e}")
    assert err <= REL_TOL
    # jaxforget re-loads identical params and an equivalent tokenizer
    again = load_model_folder(out)
    for name in NETS:
        a, b = getattr(case.model, name), getattr(again, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert params_hash(a) == params_hash(b), name
    assert again.scheduler_config == case.model.scheduler_config
    ids = case.model.tokenizer(PROMPTS, padding="max_length", max_length=77)["input_ids"]
    assert again.tokenizer(PROMPTS, padding="max_length", max_length=77)["input_ids"] == ids
    # exports are deterministic: same model -> same folder hash
    export_model_folder(case.model, tmp_path / "again")
    assert folder_hash(tmp_path / "again") == folder_hash(out)
    # the exported vocab.json + merges.txt alone (transformers 4 / hub layout) give the same ids
    (out / "tokenizer" / "tokenizer.json").unlink()
    assert F.load_tokenizer(out / "tokenizer")(PROMPTS, padding="max_length", max_length=77)["input_ids"] == ids


def test_export_float16_and_replaced_unet(folders, tmp_path):
    model = load_model_folder(folders["sdxl"])
    ref = load_torch_pipeline(folders["sdxl"])
    out = export_model_folder(model, tmp_path / "fp16", dtype="float16")
    pipe = load_torch_pipeline(out, dtype=torch.float16)
    for name, sd in state_dicts(ref).items():
        got = getattr(pipe, name).state_dict()
        for key, value in sd.items():
            assert got[key].dtype == torch.float16, f"{name}.{key}"
            assert torch.equal(got[key], value.half()), f"{name}.{key}"  # round-to-nearest, both sides
    half = load_model_folder(out)  # fp16 files load into fp32 params
    leaf = jax.tree.leaves(nnx.state(half.unet, nnx.Param))[0]
    assert leaf.dtype == jnp.float32
    assert params_hash(half.unet) != params_hash(model.unet)

    # an unlearned student replaces the UNet; everything else is the base model's
    graphdef, params, rest = nnx.split(model.unet, nnx.Param, ...)
    student = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5, params), rest)
    out = export_model_folder(model, tmp_path / "student", unet=student)
    again = load_model_folder(out)
    assert params_hash(again.unet) == params_hash(student) != params_hash(model.unet)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert params_hash(getattr(again, name)) == params_hash(getattr(model, name))
    with pytest.raises(CheckpointFormatError, match="unknown dtype 'int8'"):
        export_model_folder(model, tmp_path / "bad", dtype="int8")


# ----------------------------------------------------------------------------- 3. bad inputs
def _edit_index(edit):
    def apply(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        edit(index)
        (folder / "model_index.json").write_text(json.dumps(index))
    return apply


def _edit_unet_config(folder: Path) -> None:
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["attention_type"] = "gated"
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))


# name -> (how to break a copy of the SD1 folder, file the message names (relative), problem text)
BAD_FOLDERS = {
    "folder_missing": (lambda f: shutil.rmtree(f), "", "model folder does not exist"),
    "index_missing": (lambda f: (f / "model_index.json").unlink(), "model_index.json", "missing file"),
    "index_invalid_json": (lambda f: (f / "model_index.json").write_text('{"_class_name": "Stable'),
                           "model_index.json", "invalid JSON"),
    "unknown_pipeline": (_edit_index(lambda i: i.update(_class_name="KandinskyPipeline")), "model_index.json",
                         "unknown pipeline class 'KandinskyPipeline'"),
    "unknown_unet_class": (_edit_index(lambda i: i.update(unet=["diffusers", "UNet3DConditionModel"])),
                           "model_index.json", "unknown model class 'UNet3DConditionModel' for unet"),
    "component_entry_missing": (_edit_index(lambda i: i.pop("vae")), "model_index.json", "missing component 'vae'"),
    "component_folder_missing": (lambda f: shutil.rmtree(f / "vae"), "vae", "missing component folder"),
    "tokenizer_files_missing": (lambda f: (f / "tokenizer" / "vocab.json").unlink(), "tokenizer/vocab.json",
                                "missing tokenizer file"),
    "config_missing": (lambda f: (f / "text_encoder" / "config.json").unlink(), "text_encoder/config.json",
                       "missing file"),
    "weights_missing": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "unet",
                        "no *.safetensors weights found"),
    "config_unsupported": (_edit_unet_config, "unet/config.json", "attention_type='gated' is not supported"),
}


@pytest.mark.parametrize("name", sorted(BAD_FOLDERS))
def test_bad_folder_one_line_error(name, folders, tmp_path, monkeypatch):
    break_it, rel, problem = BAD_FOLDERS[name]
    folder = tmp_path / "model"
    shutil.copytree(folders["sd1"], folder)
    break_it(folder)
    if name != "config_unsupported":  # the folder is checked before any weights are read
        def no_weights(*a, **k):
            raise AssertionError("weights read before the folder was checked")
        monkeypatch.setattr(F, "load_module_weights", no_weights)
    with pytest.raises(CheckpointFormatError) as info:
        load_model_folder(folder)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{folder / rel if rel else folder}: "), msg
    assert problem in msg, msg


def test_export_refuses_existing_folder(folders, tmp_path):
    model = load_model_folder(folders["sd1"])
    target = tmp_path / "model"
    shutil.copytree(folders["sd2"], target)
    before = folder_hash(target), sorted(p.relative_to(target) for p in target.rglob("*"))
    with pytest.raises(CheckpointFormatError) as info:
        export_model_folder(model, target)
    assert str(info.value) == f"{target}: already exists (refusing to overwrite)"
    assert (folder_hash(target), sorted(p.relative_to(target) for p in target.rglob("*"))) == before
    # overwrite=True never deletes a folder that is not a model folder
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointFormatError, match="not a model folder"):
        export_model_folder(model, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    # overwrite=True replaces a model folder
    export_model_folder(model, target, overwrite=True)
    assert folder_hash(target) != before[0]
    assert params_hash(load_model_folder(target).unet) == params_hash(model.unet)
    assert sorted(os.listdir(tmp_path)) == ["model", "notes"]


@pytest.mark.parametrize("existing", [False, True])
def test_export_failing_midway_leaves_nothing(folders, tmp_path, monkeypatch, existing):
    model = load_model_folder(folders["sd1"])
    target = tmp_path / "out"
    if existing:  # an overwrite that fails keeps the old model intact
        shutil.copytree(folders["sd2"], target)
    before_hash = folder_hash(target) if existing else None
    calls = []
    real = F.save_tensors

    def flaky(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(F, "save_tensors", flaky)
    with pytest.raises(OSError, match="No space left"):
        export_model_folder(model, target, overwrite=existing)
    assert len(calls) == 2 and calls[0].name == "diffusion_pytorch_model.safetensors"
    assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])  # no partial folder, no temp folder
    if existing:
        assert folder_hash(target) == before_hash


def test_tokenizer_folder_layouts(folders, tmp_path):
    """Bare vocab.json + merges.txt (no tokenizer_config.json) still gives CLIP's 77-token length;
    transformers 5's tokenizer.json-only layout loads too."""
    src = folders["sd1"] / "tokenizer"
    ref = F.load_tokenizer(src)
    want = ref(PROMPTS, padding="max_length", max_length=77)["input_ids"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, bare / name)
    tok = F.load_tokenizer(bare)
    assert tok.model_max_length == 77
    assert tok(PROMPTS, padding="max_length", max_length=77)["input_ids"] == want
    ref.save_pretrained(str(tmp_path / "t5"))  # transformers 5: tokenizer.json + tokenizer_config.json
    for name in ("vocab.json", "merges.txt"):  # (what transformers 4 would add)
        (tmp_path / "t5" / name).unlink(missing_ok=True)
    assert F.load_tokenizer(tmp_path / "t5")(PROMPTS, padding="max_length", max_length=77)["input_ids"] == want


# ----------------------------------------------------------------------------- 4. folder_hash
def test_folder_hash(folders, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(folders["sd1"], a)
    h = folder_hash(a)
    assert len(h) == 16 and h == folder_hash(folders["sd1"])  # independent of the folder's location
    assert h != folder_hash(folders["sd2"])
    (tmp_path / "unrelated.safetensors").write_bytes(b"\0" * 64)  # beside the folder, not in it
    (a / ".cache").mkdir()
    (a / ".cache" / "download.json").write_text("{}")  # the hub's local cache metadata
    assert folder_hash(a) == h
    weights = a / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data
    weights.write_bytes(bytes(data))
    assert folder_hash(a) != h
    with pytest.raises(CheckpointFormatError, match="model folder does not exist"):
        folder_hash(tmp_path / "missing")


def test_model_folder_feeds_the_pipeline(case):
    """DiffusionModel.from_folder takes the loaded folder as is (schedule, SDXL flags)."""
    from jaxforget.pipeline import DiffusionModel

    dm = DiffusionModel.from_folder(case.model)
    assert dm.is_sdxl == case.model.is_sdxl and dm.unet is case.model.unet
    assert dm.schedule.prediction_type == case.pipe.scheduler.config.prediction_type
    assert dm.default_size == (2 * LATENT_SIZE, 2 * LATENT_SIZE)
    if case.kind == "sdxl":
        assert dm.force_zeros_for_empty_prompt is True
        assert case.model.unet.config.addition_time_embed_dim == ADD_TIME_DIM
