"""Load a diffusers-format pipeline folder into jaxforget's Flax modules, and export one back.

Layout (as written by diffusers' ``save_pretrained``)::

    model_index.json
    unet/config.json, unet/diffusion_pytorch_model[.fp16].safetensors[.index.json + shards]
    vae/...             text_encoder/config.json, text_encoder/model.safetensors
    tokenizer/vocab.json, merges.txt, ... (or transformers 5's tokenizer.json)
    scheduler/scheduler_config.json
    text_encoder_2/, tokenizer_2/             (SDXL)

No torch import: weights are read with safetensors' numpy backend and mapped through the key tables.
Loading checks the whole folder (index, classes, component folders, configs, tokenizer and weight
files) before reading any weights, so a broken folder fails fast with one line naming the file.
Exports are written to a temporary sibling folder and renamed into place, so a crash never leaves a
half-written model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from jaxforget.errors import CheckpointFormatError, ConfigError
from jaxforget.io.clip_keys import CLIP_KEYS
from jaxforget.io.unet_keys import UNET_KEYS
from jaxforget.io.vae_keys import VAE_KEYS
from jaxforget.io.weights import (
    DTYPES, KeyTable, find_weight_files, load_module_weights, module_to_tensors, save_tensors,
)
from jaxforget.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig
from jaxforget.models.vae import AutoencoderKL, VAEConfig

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
SCHEDULER_CLASSES = (
    "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
    "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
)
CONFIG_NAME = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
               "text_encoder_2": "config.json", "scheduler": "scheduler_config.json"}
WEIGHT_NAME = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
# model classes jaxforget can load, per model_index.json entry
MODEL_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": TOKENIZER_CLASSES,
    "tokenizer_2": TOKENIZER_CLASSES,
    "scheduler": SCHEDULER_CLASSES,
}
# a tokenizer folder needs one of these file sets (hub SD layout / transformers 5's save_pretrained)
TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))
CLIP_MAX_LENGTH = 77


@dataclass
class ModelFolder:
    """The components of a Stable Diffusion (1.x/2.x) or SDXL pipeline, as jaxforget modules."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: Any | None = None
    model_index: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; CheckpointFormatError naming the file if absent or invalid."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: missing file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object")
    return data


def _component_class(index: dict, name: str, path: Path) -> str | None:
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise CheckpointFormatError(f"{path / 'model_index.json'}: field {name!r} must be [library, class]")
    return entry[1]


def _check_class(cls: str | None, allowed: tuple[str, ...], name: str, path: Path) -> None:
    if cls not in allowed:
        raise CheckpointFormatError(
            f"{path / 'model_index.json'}: unknown model class {cls!r} for {name} (supported: {', '.join(allowed)})"
        )


def _parse_config(path: Path, parse: Callable[[dict], Any]) -> Any:
    """Parse a component config; a config the model code rejects is reported against its file."""
    data = read_json(path)
    try:
        return parse(data)
    except ConfigError as err:
        raise CheckpointFormatError(f"{path}: {err}") from None


def check_tokenizer_files(folder: Path) -> None:
    """Raise unless ``folder`` holds vocab.json + merges.txt or tokenizer.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointFormatError(f"{folder}: missing component folder")
    for names in TOKENIZER_FILE_SETS:
        if all((folder / n).is_file() for n in names):
            return
    missing = [n for n in TOKENIZER_FILE_SETS[0] if not (folder / n).is_file()]
    raise CheckpointFormatError(
        f"{folder / missing[0]}: missing tokenizer file (a CLIP tokenizer needs vocab.json + merges.txt "
        "or tokenizer.json)"
    )


def load_tokenizer(folder: Path):
    """A ``transformers.CLIPTokenizer`` from a tokenizer folder (hub or transformers-5 layout)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    check_tokenizer_files(folder)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointFormatError(f"{folder}: cannot load the CLIP tokenizer ({msg})") from None
    if tokenizer.model_max_length > 100_000:
        # no tokenizer_config.json (bare vocab.json + merges.txt): transformers leaves the length
        # "unlimited"; every Stable Diffusion text encoder takes CLIP's 77 tokens
        tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def _loader(
    dtype, put: Callable[[tuple, np.ndarray], jax.Array] | None, variant: str | None
) -> Callable[[Callable[[], nnx.Module], Path, KeyTable], nnx.Module]:
    def load(build, folder, table):
        return load_module_weights(build, folder, table, variant=variant, dtype=dtype, put=put)

    return load


def load_unet(folder: Path, *, compute_dtype=None, param_dtype=None, variant=None, put=None) -> UNet2DConditionModel:
    """A UNet component folder -> UNet2DConditionModel (params in ``param_dtype``, default fp32)."""
    cfg = _parse_config(Path(folder) / "config.json", UNetConfig.from_diffusers)
    build = lambda: UNet2DConditionModel(cfg, dtype=compute_dtype, rngs=nnx.Rngs(0))  # noqa: E731
    return _loader(param_dtype, put, variant)(build, Path(folder), UNET_KEYS)


def load_vae(folder: Path, *, compute_dtype=None, param_dtype=None, variant=None, put=None) -> AutoencoderKL:
    """A VAE component folder -> AutoencoderKL."""
    cfg = _parse_config(Path(folder) / "config.json", VAEConfig.from_diffusers)
    build = lambda: AutoencoderKL(cfg, dtype=compute_dtype, rngs=nnx.Rngs(0))  # noqa: E731
    return _loader(param_dtype, put, variant)(build, Path(folder), VAE_KEYS)


def load_text_encoder(
    folder: Path, *, with_projection: bool = False, compute_dtype=None, param_dtype=None, variant=None, put=None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A text encoder folder -> CLIPTextModel (or CLIPTextModelWithProjection, SDXL's second)."""
    cfg = _parse_config(Path(folder) / "config.json", CLIPTextConfig.from_transformers)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    build = lambda: cls(cfg, dtype=compute_dtype, rngs=nnx.Rngs(0))  # noqa: E731
    return _loader(param_dtype, put, variant)(build, Path(folder), CLIP_KEYS)


def _check_folder(path: Path, variant: str | None) -> tuple[dict, bool]:
    """Validate everything cheap before any weights are read. Returns (model_index, is_sdxl)."""
    if not path.is_dir():
        raise CheckpointFormatError(f"{path}: model folder does not exist")
    index_path = path / "model_index.json"
    index = read_json(index_path)
    pipeline_cls = index.get("_class_name")
    if pipeline_cls not in SUPPORTED_PIPELINES:
        raise CheckpointFormatError(
            f"{index_path}: unknown pipeline class {pipeline_cls!r} (supported: {', '.join(SUPPORTED_PIPELINES)})"
        )
    sdxl = pipeline_cls == "StableDiffusionXLPipeline"
    required = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + (
        ["text_encoder_2", "tokenizer_2"] if sdxl else []
    )
    for name in required:
        cls = _component_class(index, name, path)
        if cls is None:
            raise CheckpointFormatError(f"{index_path}: missing component {name!r}")
        _check_class(cls, MODEL_CLASSES[name], name, path)
    for name in required:
        if not (path / name).is_dir():
            raise CheckpointFormatError(f"{path / name}: missing component folder")
        if name.startswith("tokenizer"):
            check_tokenizer_files(path / name)
            continue
        read_json(path / name / CONFIG_NAME[name])
        if name != "scheduler":
            find_weight_files(path / name, variant)  # missing / pickle-only weights, before any loading
    return index, sdxl


def load_model_folder(
    path: str | os.PathLike,
    *,
    compute_dtype=None,
    param_dtype=None,
    variant: str | None = None,
    put: Callable[[tuple, np.ndarray], jax.Array] | None = None,
) -> ModelFolder:
    """Load every component of a diffusers pipeline folder (SD 1.x / 2.x / SDXL).

    ``compute_dtype``: the modules' compute dtype (None: the input's); ``param_dtype``: the stored
    parameter dtype (None: fp32); ``variant``: e.g. "fp16" for ``*.fp16.safetensors`` files;
    ``put(path, array)``: places each parameter (e.g. onto a sharding). Raises
    CheckpointFormatError (one line naming the file) for any problem with the folder.
    """
    path = Path(path)
    index, sdxl = _check_folder(path, variant)
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, variant=variant, put=put)
    return ModelFolder(
        unet=load_unet(path / "unet", **kw),
        vae=load_vae(path / "vae", **kw),
        text_encoder=load_text_encoder(path / "text_encoder", **kw),
        tokenizer=load_tokenizer(path / "tokenizer"),
        scheduler_config=read_json(path / "scheduler" / CONFIG_NAME["scheduler"]),
        text_encoder_2=load_text_encoder(path / "text_encoder_2", with_projection=True, **kw) if sdxl else None,
        tokenizer_2=load_tokenizer(path / "tokenizer_2") if sdxl else None,
        model_index=index,
        path=path,
    )


# ----------------------------------------------------------------------------- export
def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """save_pretrained, plus vocab.json + merges.txt when the tokenizer did not write them
    (transformers 5 writes only tokenizer.json; transformers 4 and the hub layout need the pair)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.padding is not None or backend.truncation is not None):
        # a fast tokenizer keeps the padding/truncation of its last call and save_pretrained
        # writes it into tokenizer.json: clear it (on a copy) so exports depend only on the model
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.backend_tokenizer.no_padding()
        tokenizer.backend_tokenizer.no_truncation()
    tokenizer.save_pretrained(str(folder))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    if backend is None:
        return
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


def _make_readable(root: Path) -> None:
    # mkdtemp / mkstemp create 0700 / 0600 entries; an exported model should have ordinary modes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def export_model_folder(
    model: ModelFolder,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    unet: UNet2DConditionModel | None = None,
) -> Path:
    """Write a diffusers folder that StableDiffusion(XL)Pipeline.from_pretrained loads.

    ``unet`` replaces the folder's UNet (an unlearned student). ``dtype``: float32, float16 or
    bfloat16 weights (plain file names, no variant suffix). Refuses to overwrite an existing
    folder unless asked (and even then only an empty folder or a model folder: one with
    model_index.json). Writes into a temporary sibling and renames it into place, so an export
    that fails leaves neither a partial folder nor the temporary one.
    """
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise CheckpointFormatError(f"export: unknown dtype {dtype!r} (use float32, float16 or bfloat16)")
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise CheckpointFormatError(f"{out_dir}: already exists (refusing to overwrite)")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise CheckpointFormatError(f"{out_dir}: exists and is not a folder (refusing to overwrite)")
        if any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
            raise CheckpointFormatError(
                f"{out_dir}: exists and is not a model folder (no model_index.json; refusing to overwrite)")
    np_dtype = DTYPES[dtype]
    torch_dtype_name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
        np.dtype(np_dtype), "bfloat16")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        unet = unet if unet is not None else model.unet
        sdxl = model.is_sdxl
        if sdxl and model.tokenizer_2 is None:
            raise CheckpointFormatError(f"export to {out_dir}: an SDXL model needs tokenizer_2")
        index = {
            "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
            "_diffusers_version": model.model_index.get("_diffusers_version", "0.30.0"),
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "DDIMScheduler")],
        }
        if sdxl:
            index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"],
                         force_zeros_for_empty_prompt=model.model_index.get("force_zeros_for_empty_prompt", True))
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None],
                         requires_safety_checker=False)
        _write_json(tmp / "model_index.json", index)

        def te_config(module, arch: str) -> dict:
            return {**module.config.to_transformers(arch), "torch_dtype": torch_dtype_name}

        components: list[tuple[str, nnx.Module, KeyTable, dict, str]] = [
            ("unet", unet, UNET_KEYS, unet.config.to_diffusers(), WEIGHT_NAME["diffusers"]),
            ("vae", model.vae, VAE_KEYS, model.vae.config.to_diffusers(), WEIGHT_NAME["diffusers"]),
            ("text_encoder", model.text_encoder, CLIP_KEYS, te_config(model.text_encoder, "CLIPTextModel"),
             WEIGHT_NAME["transformers"]),
        ]
        if sdxl:
            components.append(("text_encoder_2", model.text_encoder_2, CLIP_KEYS,
                               te_config(model.text_encoder_2, "CLIPTextModelWithProjection"),
                               WEIGHT_NAME["transformers"]))
        for name, module, table, config, weight_name in components:
            _write_json(tmp / name / "config.json", config)
            save_tensors(module_to_tensors(module, table, np_dtype), tmp / name / weight_name)
        _write_json(tmp / "scheduler" / CONFIG_NAME["scheduler"], model.scheduler_config)
        _save_tokenizer(model.tokenizer, tmp / "tokenizer")
        if sdxl:
            _save_tokenizer(model.tokenizer_2, tmp / "tokenizer_2")
        _make_readable(tmp)
        if out_dir.exists():
            # rename the old folder aside first: os.replace cannot replace a non-empty folder,
            # and the old model must survive if the swap fails
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------- hashes
def _hashed_files(path: Path) -> list[Path]:
    # configs, weights and tokenizer files; hidden entries (e.g. the hub's .cache/) and anything
    # else (README, images, temp files) do not change the model
    out = []
    for f in path.rglob("*"):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if rel.parts[0].startswith("tokenizer") or f.name.endswith((".json", ".safetensors", ".txt")):
            out.append(f)
    return sorted(out, key=lambda f: f.relative_to(path).as_posix())


def folder_hash(path: str | os.PathLike) -> str:
    """A content hash of a model folder's configs, weights and tokenizer files (16 hex digits):
    identifies the base model of a run. Independent of where the folder lives."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"{path}: model folder does not exist")
    h = hashlib.sha256()
    for f in _hashed_files(path):
        rel = f.relative_to(path).as_posix()
        h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def params_hash(module: nnx.Module) -> str:
    """A hash of a module's parameter paths, shapes, dtypes and values (16 hex digits): bit-exact
    comparisons and base-model identity."""
    h = hashlib.sha256()
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        arr = np.ascontiguousarray(np.asarray(jax.device_get(var[...])))
        h.update(f"{'.'.join(map(str, path))}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "ModelFolder", "load_model_folder", "export_model_folder", "load_unet", "load_vae",
    "load_text_encoder", "load_tokenizer", "check_tokenizer_files", "folder_hash", "params_hash", "read_json",
]
